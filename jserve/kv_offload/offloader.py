"""Runs the host tier's copies for the engine, one batch per step, before the step is dispatched.

Device -> host: the pages the step's allocations evicted are gathered in one queued program (before the step,
which may overwrite them) and their copy to the host starts at once (``copy_to_host_async``); the engine
thread does not wait for it. The data lands in the host pool at the next step's flush, long arrived by then.
Host -> device: host rows of pages restored this step are scattered into their device pages, queued before
the step that reads them. A restore of a page whose data is still on its way first waits for it (rare: the
page was evicted and wanted back in the same step).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jserve.kv_offload.host_tier import HostKVTier
from jserve.kv_offload.page_mover import PageMover, ProgramFor
from jserve.kv_offload.policy import CopyCosts


class KVOffloader:
    """Moves pages between the device buffers (``PageMover``) and the host tier (``HostKVTier``)."""

    def __init__(self, host: HostKVTier, mover: PageMover, program_for: ProgramFor) -> None:
        self.host = host
        self.mover = mover
        self._program_for = program_for
        self.costs: CopyCosts | None = None  # measured before ready (policy.py); None when not measured
        # (host pages, their generations, gathered arrays) on their way to the host
        self._pending: list[tuple[list[int], list[int], list[jax.Array]]] = []

    def flush(self, offloads: list[tuple[int, int, int]], restores: list[tuple[int, int]]) -> None:
        """Queues this step's copies: ``offloads`` (device page, host page, generation) first, then ``restores``
        (host page, device page). Call before dispatching the step they belong to."""
        if not (offloads or restores or self._pending):
            return
        start = time.perf_counter()
        self.finish_arrived()
        if offloads:
            self._offload(offloads)
        if restores:
            self._restore(restores)
        self.host.counters.copy_seconds += time.perf_counter() - start

    def _offload(self, offloads: list[tuple[int, int, int]]) -> None:
        done = 0
        for count, arrays in self.mover.gather([d for d, _, _ in offloads], self._program_for):
            for array in arrays:
                array.copy_to_host_async()
            chunk = offloads[done : done + count]
            self._pending.append(([h for _, h, _ in chunk], [g for _, _, g in chunk], arrays))
            done += count
        self.host.counters.pages_offloaded += len(offloads)
        self.host.counters.bytes_to_host += len(offloads) * self.host.page_bytes

    def _restore(self, restores: list[tuple[int, int]]) -> None:
        host_pages = [h for h, _ in restores]
        if any(self.host.is_incoming(page) for page in host_pages):
            self.finish_arrived()
        self.mover.scatter([d for _, d in restores], self.host.pools, host_pages, self._program_for)
        self.host.end_restore(host_pages)
        self.host.counters.pages_restored += len(restores)
        self.host.counters.bytes_to_device += len(restores) * self.host.page_bytes

    def finish_arrived(self) -> None:
        """Moves every copy on its way into the host pool (waits for those not arrived yet)."""
        pending, self._pending = self._pending, []
        for host_pages, generations, arrays in pending:
            self.host.store(host_pages, generations, [np.asarray(array) for array in arrays])

    def drop_pending(self) -> None:
        """Forgets the copies on their way, and the host pages waiting for them (after a failed step: their
        data is not to be trusted)."""
        pending, self._pending = self._pending, []
        for host_pages, generations, _ in pending:
            self.host.drop_incoming(host_pages, generations)
