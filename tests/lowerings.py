"""Counts XLA programs lowered, with jax's own monitoring events (not the engine's bookkeeping)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from jax import monitoring

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

_active: list[list[str]] = []
_lock = threading.Lock()
_registered = False


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == LOWERING_EVENT:
        with _lock:
            for sink in _active:
                sink.append(kwargs.get("fun_name", "?"))


@contextlib.contextmanager
def count_lowerings() -> Iterator[list[str]]:
    """Yields a list that collects one entry (the function's name) per program lowered inside the block."""
    global _registered
    with _lock:
        if not _registered:
            monitoring.register_event_duration_secs_listener(_listener)
            _registered = True
        sink: list[str] = []
        _active.append(sink)
    try:
        yield sink
    finally:
        with _lock:
            _active.remove(sink)
