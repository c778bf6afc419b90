"""Counts the XLA programs this process lowers, from jax's own monitoring events.

The engine compiles its whole program set before it is ready; after that, any lowering is a bug (a shape or a
static argument that slipped through) that would stall serving for a compile. ``Engine.stats()`` reports the
count since ready as ``programs_lowered_while_serving``, and the Prometheus endpoint exports it, so an
operator (and the tests) can see that serving compiles nothing.
"""

from __future__ import annotations

import threading

from jax import monitoring

LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

_lock = threading.Lock()
_count = 0
_installed = False


def _on_event(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == LOWERING_EVENT:
        with _lock:
            _count += 1


def install() -> None:
    """Starts counting (idempotent; jax offers no way to unregister a listener)."""
    global _installed
    with _lock:
        if not _installed:
            monitoring.register_event_duration_secs_listener(_on_event)
            _installed = True


def programs_lowered() -> int:
    """Programs lowered in this process since ``install()``."""
    with _lock:
        return _count
