"""Multi-host: ``jax.distributed`` start-up, and keeping every process's engine in lockstep.

All processes build the same engine over one global mesh and must run the same step programs in the same order.
The scheduler is deterministic, so it is enough that every process sees the same inbox (adds and aborts) at the
start of every step: process 0 (the leader, which serves gRPC) broadcasts its drained inbox each step, and the
other processes (followers) apply exactly that and step. A STOP item ends the followers' loop.
"""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np

STOP = "__jserve_stop__"


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Joins the job; on CPU the cross-process collectives go through gloo."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if not coordinator_address or ":" not in coordinator_address:
        raise ValueError(f"coordinator_address must be HOST:PORT, got {coordinator_address!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def is_leader() -> bool:
    return jax.process_index() == 0


def _bucket(n: int) -> int:
    size = 256
    while size < n:
        size *= 2
    return size


def broadcast_items(items: list[Any]) -> list[Any]:
    """The leader's items, on every process (two small collectives: size, then the padded payload)."""
    from jax.experimental import multihost_utils

    payload = np.frombuffer(pickle.dumps(items), np.uint8) if is_leader() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array([payload.size], np.int32))[0])
    buffer = np.zeros(_bucket(size), np.uint8)
    buffer[: payload.size] = payload
    data = np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size]
    return pickle.loads(data.tobytes())  # noqa: S301 - bytes come from our own leader process


def follow(engine) -> None:
    """A follower's main loop: step whenever the leader steps, until it broadcasts STOP."""
    while engine.step_following():
        pass


def stop_followers(engine) -> None:
    """Leader: tell the followers to exit their loop."""
    engine.broadcast_stop()
