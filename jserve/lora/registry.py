"""The server's adapters by name: what the OpenAI ``model`` field, gRPC ``lora_name`` and JetStream's
``lora_adapter_id`` select. Loading reads and checks the adapter (into each replica's host tier) before its
name is served; ids are assigned here, so clients never see them."""

from __future__ import annotations

import threading

from jserve.lora.request import LoRARequest


class AdapterNotFoundError(LookupError):
    """No adapter of that name is loaded (HTTP 404, gRPC NOT_FOUND)."""


class AdapterRegistry:
    """name -> LoRARequest over an engine (``register_adapter`` / ``unload_adapter``)."""

    def __init__(self, engine, base_model_name: str):
        self.engine = engine
        self.base_model_name = base_model_name
        self._by_name: dict[str, LoRARequest] = {}
        self._next_id = 1
        self._lock = threading.Lock()

    def load(self, name: str, path: str) -> LoRARequest:
        """Reads the adapter at ``path`` and serves it as ``name``; ValueError when it cannot be served (bad
        name, a name already loaded, an adapter that does not fit). Blocking (disk): off the event loop."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError("lora_name must be a non-empty string")
        if not isinstance(path, str) or not path:
            raise ValueError("lora_path must be a non-empty string")
        if name == self.base_model_name:
            raise ValueError(f"lora_name {name!r} is the base model's name")
        with self._lock:
            if name in self._by_name:
                raise ValueError(f"lora_name {name!r} is already loaded (unload it first)")
            request = LoRARequest(name, self._next_id, path)
            self._next_id += 1
        self.engine.register_adapter(request)  # raises ValueError, naming the reason
        with self._lock:
            lost = name in self._by_name  # a concurrent load of the same name won
            if not lost:
                self._by_name[name] = request
        if lost:
            self.engine.unload_adapter(request.lora_int_id)
            raise ValueError(f"lora_name {name!r} is already loaded (unload it first)")
        return request

    def unload(self, name: str) -> None:
        with self._lock:
            request = self._by_name.pop(name, None)
        if request is None:
            raise AdapterNotFoundError(f"lora_name {name!r} is not loaded")
        self.engine.unload_adapter(request.lora_int_id)

    def get(self, name: str) -> LoRARequest:
        with self._lock:
            request = self._by_name.get(name)
        if request is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        return request

    def loaded(self) -> list[LoRARequest]:
        with self._lock:
            return list(self._by_name.values())
