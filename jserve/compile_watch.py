"""Counts the XLA programs each engine lowers while serving, from jax's own monitoring events.

The engine compiles its whole program set before it is ready; after that, any lowering is a bug (a shape or a
static argument that slipped through) that would stall serving for a compile. ``Engine.stats()`` reports the
count since ready as ``programs_lowered_while_serving``, and the Prometheus endpoint exports it, so an
operator (and the tests) can see that serving compiles nothing. An engine counts the lowerings made inside its
own steps (``LoweringCounter.active`` around them): jax reports a lowering in the thread that lowers, so another
engine in the same process, or anything else the process compiles, is not charged to it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from jax import monitoring

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

_lock = threading.Lock()
_installed = False
_local = threading.local()  # .counter: the LoweringCounter active in this thread, if any


class LoweringCounter:
    """Programs lowered in the calling thread while this counter is active (see ``active``)."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Lowerings in this thread until the block ends count here (nested blocks: the innermost counter)."""
        install()
        previous = getattr(_local, "counter", None)
        _local.counter = self
        try:
            yield
        finally:
            _local.counter = previous


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event == LOWERING_EVENT:
        counter = getattr(_local, "counter", None)
        if counter is not None:
            with _lock:
                counter.count += 1


def install() -> None:
    """Starts counting (idempotent; jax offers no way to unregister a listener)."""
    global _installed
    with _lock:
        if not _installed:
            monitoring.register_event_duration_secs_listener(_on_event)
            _installed = True
