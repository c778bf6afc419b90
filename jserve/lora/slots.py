"""The two tiers of adapters: a host LRU of loaded adapters (``max_cpu_loras``) and the device slots
(``max_loras``). Plain Python, no jax: the scheduler asks it whether a request can run now.

A slot is in use while a scheduled (running) request holds it; an idle slot keeps its adapter until a request
of another adapter needs the slot (least recently idle first). A request whose adapter is not resident waits
while every slot is in use, without holding back requests of resident adapters or the base model. Loads are
queued here and written to the device by the engine before the step that first reads them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jserve.lora.request import LoRARequest

if TYPE_CHECKING:
    from jserve.lora.peft_adapter import HostAdapter


@dataclass
class SlotCounters:
    loads: int = 0  # adapters written into a device slot
    evictions: int = 0  # resident adapters replaced in their slot
    disk_loads: int = 0  # adapters read from disk (first use, or after leaving the host tier)
    waits: int = 0  # requests that waited for a free slot
    wait_seconds: float = 0.0  # their total time waiting


class AdapterSlots:
    """Adapter id -> host copy and device slot; ``load`` reads a ``LoRARequest`` from disk (raises ValueError)."""

    def __init__(self, num_slots: int, max_cpu_loras: int, load: Callable[[LoRARequest], HostAdapter]):
        self.num_slots = num_slots
        self.max_cpu_loras = max(max_cpu_loras, num_slots)
        self._load = load
        self._lock = threading.Lock()  # register() runs on callers' threads, the rest on the engine's
        self._known: dict[int, LoRARequest] = {}  # every adapter registered (and not forgotten)
        self._host: OrderedDict[int, HostAdapter] = OrderedDict()  # least recently used first
        self._slot_of: dict[int, int] = {}  # adapter id -> its device slot (0-based)
        self._adapter_in: list[int | None] = [None] * num_slots
        self._users = [0] * num_slots
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))  # LRU first
        self._pending: list[tuple[int, HostAdapter]] = []
        self.counters = SlotCounters()

    # ---- any thread ------------------------------------------------------------------------------
    def register(self, request: LoRARequest) -> None:
        """Reads the adapter into the host tier (once per id) so a bad adapter is refused when the request is
        made, not when it is scheduled. ValueError: unreadable, or the id already names another adapter."""
        with self._lock:
            known = self._known.get(request.lora_int_id)
            if known is not None:
                if known != request:
                    raise ValueError(
                        f"lora_request.lora_int_id {request.lora_int_id} already names adapter "
                        f"{known.lora_name!r} ({known.lora_path})"
                    )
                return  # read before (if it left the host tier since, the engine reads it again when placing it)
        adapter = self._load(request)
        with self._lock:
            self.counters.disk_loads += 1
            self._known[request.lora_int_id] = request
            self._keep_on_host(adapter)

    def forget(self, lora_int_id: int) -> None:
        """Drops an adapter from both tiers (unload); requests running with it finish with it."""
        with self._lock:
            self._known.pop(lora_int_id, None)
            self._host.pop(lora_int_id, None)
            slot = self._slot_of.pop(lora_int_id, None)
            if slot is not None:
                self._adapter_in[slot] = None

    @property
    def resident(self) -> list[int]:
        """Ids of the adapters in device slots."""
        return [a for a in self._adapter_in if a is not None]

    @property
    def num_on_host(self) -> int:
        return len(self._host)

    # ---- engine thread ---------------------------------------------------------------------------
    def can_run(self, request) -> bool:
        """Whether ``request`` (an engine Request) can get its adapter's slot now."""
        lora = request.lora_request
        if lora is None or lora.lora_int_id in self._slot_of or self._idle:
            return True
        if request.lora_wait_since is None:
            request.lora_wait_since = time.monotonic()
            self.counters.waits += 1
        return False

    def acquire(self, request) -> None:
        """Gives a scheduled request its adapter's slot (loading the adapter into one when not resident)."""
        lora = request.lora_request
        if lora is None or request.lora_slot:
            return
        with self._lock:
            slot = self._slot_of.get(lora.lora_int_id)
            if slot is None:
                slot = self._place(lora)
            self._users[slot] += 1
            self._idle.pop(slot, None)
        request.lora_slot = slot + 1
        if request.lora_wait_since is not None:
            self.counters.wait_seconds += time.monotonic() - request.lora_wait_since
            request.lora_wait_since = None

    def release(self, request) -> None:
        """The request left the running set (finished, preempted): its slot may go idle."""
        if not request.lora_slot:
            return
        slot = request.lora_slot - 1
        request.lora_slot = 0
        with self._lock:
            self._users[slot] -= 1
            if self._users[slot] == 0:
                self._idle[slot] = None
                if self._adapter_in[slot] is None:  # unloaded while in use: free first
                    self._idle.move_to_end(slot, last=False)

    def take_loads(self) -> list[tuple[int, HostAdapter]]:
        """(slot, adapter) writes queued since the last call, for the device."""
        loads, self._pending = self._pending, []
        return loads

    # ---- internals (lock held) -------------------------------------------------------------------
    def _place(self, lora: LoRARequest) -> int:
        adapter = self._host.get(lora.lora_int_id)
        if adapter is None:  # left the host tier meanwhile: read it again (it was valid when registered)
            adapter = self._load(lora)
            self.counters.disk_loads += 1
            self._keep_on_host(adapter)
        else:
            self._host.move_to_end(lora.lora_int_id)
        slot, _ = self._idle.popitem(last=False)
        previous = self._adapter_in[slot]
        if previous is not None:
            del self._slot_of[previous]
            self.counters.evictions += 1
        self._adapter_in[slot] = lora.lora_int_id
        self._slot_of[lora.lora_int_id] = slot
        self._pending.append((slot, adapter))
        self.counters.loads += 1
        return slot

    def _keep_on_host(self, adapter: HostAdapter) -> None:
        self._host[adapter.request.lora_int_id] = adapter
        self._host.move_to_end(adapter.request.lora_int_id)
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
