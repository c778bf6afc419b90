"""The two tiers of adapters: a host LRU of read adapters (``max_cpu_loras``) and the device slots
(``max_loras``). Plain Python, no jax: the scheduler asks it whether a request can run now.

An adapter is read (and checked) on the caller's thread when a request names it (``register``); the request
then carries its host copy, so the engine thread never reads a disk and a request's weights are the ones it was
admitted with, whatever is unloaded or registered meanwhile. Slots are keyed by the whole ``LoRARequest`` (id,
name and path), never by the id alone.

A slot is in use while a scheduled (running) request holds it; an idle slot keeps its adapter until a request
of another adapter needs the slot (least recently idle first). A request whose adapter is not resident waits
while every slot is in use, without holding back requests of resident adapters or of the base model. Loads are
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

MAX_SLOT_WAIT = 1.0
"""Seconds a request may wait for a slot before requests of resident adapters stop being admitted ahead of it
(their slots then drain and go idle): without it, steady traffic on resident adapters could park it forever."""


@dataclass
class SlotCounters:
    loads: int = 0  # adapters written into a device slot
    evictions: int = 0  # resident adapters replaced in their slot
    disk_loads: int = 0  # adapters read from disk (first use, or after leaving the host tier)
    waits: int = 0  # requests that waited for a free slot
    wait_seconds: float = 0.0  # their total time waiting


class AdapterSlots:
    """Registered adapters, their host copies and the device slots; ``load`` reads a ``LoRARequest`` from disk
    (raises ValueError)."""

    def __init__(self, num_slots: int, max_cpu_loras: int, load: Callable[[LoRARequest], HostAdapter]):
        self.num_slots = num_slots
        self.max_cpu_loras = max(max_cpu_loras, num_slots)
        self._load = load
        self._lock = threading.Lock()  # register() / forget() run on callers' threads, the rest on the engine's
        self._known: dict[int, LoRARequest] = {}  # id -> the adapter it names (ids are unique while registered)
        self._host: OrderedDict[LoRARequest, HostAdapter] = OrderedDict()  # least recently used first
        self._slot_of: dict[LoRARequest, int] = {}  # adapter -> its device slot (0-based)
        self._adapter_in: list[LoRARequest | None] = [None] * num_slots
        self._users = [0] * num_slots
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))  # LRU first
        self._pending: list[tuple[int, HostAdapter]] = []
        self.counters = SlotCounters()

    # ---- any thread ------------------------------------------------------------------------------
    def register(self, request: LoRARequest) -> HostAdapter:
        """The adapter's host copy, read (and checked) now unless the host tier holds it. ValueError: unreadable,
        or its id already names another adapter."""
        with self._lock:
            self._check_id(request)
            adapter = self._host.get(request)
            if adapter is not None:
                self._host.move_to_end(request)
                return adapter
        adapter = self._load(request)
        with self._lock:
            self._check_id(request)  # another thread may have registered the id meanwhile
            self._known[request.lora_int_id] = request
            self.counters.disk_loads += 1
            self._host[request] = adapter
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        return adapter

    def forget(self, lora_int_id: int) -> None:
        """Unload: the id is free again and new requests cannot get the adapter's slot; requests already made
        with it run with their own copy."""
        with self._lock:
            request = self._known.pop(lora_int_id, None)
            if request is None:
                return
            self._host.pop(request, None)
            slot = self._slot_of.pop(request, None)
            if slot is not None:
                self._adapter_in[slot] = None
                if slot in self._idle:
                    self._idle.move_to_end(slot, last=False)  # free: reused first

    @property
    def resident(self) -> list[LoRARequest]:
        """The adapters in device slots."""
        return [a for a in self._adapter_in if a is not None]

    @property
    def num_on_host(self) -> int:
        return len(self._host)

    # ---- engine thread ---------------------------------------------------------------------------
    def try_acquire(self, request) -> bool:
        """Gives a request (an engine Request carrying ``lora_adapter``) its adapter's slot, loading the adapter
        into an idle slot when it is not resident; False (it waits) while every slot is in use."""
        lora = request.lora_request
        if lora is None or request.lora_slot:
            return True
        with self._lock:
            slot = self._slot_of.get(lora)
            if slot is None:
                if not self._idle:
                    if request.lora_wait_since is None:
                        request.lora_wait_since = time.monotonic()
                        self.counters.waits += 1
                    return False
                slot = self._place(lora, request.lora_adapter)
            self._users[slot] += 1
            self._idle.pop(slot, None)
        request.lora_slot = slot + 1
        if request.lora_wait_since is not None:
            self.counters.wait_seconds += time.monotonic() - request.lora_wait_since
            request.lora_wait_since = None
        return True

    def release(self, request) -> None:
        """The request left the running set (finished, preempted, not admitted after all): its slot may go idle."""
        if not request.lora_slot:
            return
        slot = request.lora_slot - 1
        request.lora_slot = 0
        with self._lock:
            self._users[slot] -= 1
            if self._users[slot] == 0:
                self._idle[slot] = None
                if self._adapter_in[slot] is None:  # unloaded while in use: free, reused first
                    self._idle.move_to_end(slot, last=False)

    def take_loads(self) -> list[tuple[int, HostAdapter]]:
        """(slot, adapter) writes queued since the last call, for the device."""
        loads, self._pending = self._pending, []
        return loads

    def unwritten(self, slot: int) -> None:
        """A queued write into ``slot`` failed: it holds no known adapter (its users are recomputed and load
        their adapter again)."""
        with self._lock:
            adapter = self._adapter_in[slot]
            if adapter is not None:
                self._adapter_in[slot] = None
                self._slot_of.pop(adapter, None)

    @staticmethod
    def starving(waiting, now: float | None = None) -> bool:
        """Some request of ``waiting`` has waited for a slot longer than ``MAX_SLOT_WAIT``."""
        now = time.monotonic() if now is None else now
        return any(r.lora_wait_since is not None and now - r.lora_wait_since > MAX_SLOT_WAIT for r in waiting)

    # ---- internals (lock held) -------------------------------------------------------------------
    def _check_id(self, request: LoRARequest) -> None:
        known = self._known.get(request.lora_int_id)
        if known is not None and known != request:
            raise ValueError(
                f"lora_request.lora_int_id {request.lora_int_id} already names adapter {known.lora_name!r} "
                f"({known.lora_path})"
            )

    def _place(self, lora: LoRARequest, adapter: HostAdapter) -> int:
        slot, _ = self._idle.popitem(last=False)
        previous = self._adapter_in[slot]
        if previous is not None:
            del self._slot_of[previous]
            self.counters.evictions += 1
        self._adapter_in[slot] = lora
        self._slot_of[lora] = slot
        self._pending.append((slot, adapter))
        self.counters.loads += 1
        return slot
