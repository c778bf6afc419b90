"""The memory-map guard: building a program that could cross ``vm.max_map_count`` raises a clear error (XLA:CPU
would otherwise crash the process); with room, programs build and their growth becomes the next estimate."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest

from jserve import memory_maps
from jserve.executable_cache import compile_lowered

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def _lowered(seed: int):
    """A small program of a few kernels (distinct per seed: jax's in-memory caches never serve it)."""
    return jax.jit(lambda x: jnp.tanh(x @ x.T + seed).sum(0) * jnp.cos(x).max()).lower(jnp.ones((8, 8)))


def test_counts_come_from_proc():
    used, limit = memory_maps.maps_in_use(), memory_maps.map_limit()
    assert used is not None and limit is not None
    assert 0 < used < limit


def test_a_program_that_could_cross_the_limit_is_refused(monkeypatch):
    used = memory_maps.maps_in_use()
    monkeypatch.setattr(memory_maps, "map_limit", lambda: used + memory_maps.MARGIN + 10)
    with pytest.raises(memory_maps.MemoryMapsExhausted, match=r"vm\.max_map_count"):
        compile_lowered(_lowered(1))


def test_with_room_a_program_builds_and_its_growth_is_recorded(monkeypatch):
    monkeypatch.setattr(memory_maps, "_largest_growth", 0)
    monkeypatch.setattr(memory_maps, "_measured", 0)
    compiled = compile_lowered(_lowered(2))
    assert float(compiled(jnp.ones((8, 8)))[0]) == pytest.approx(8 * float(jnp.tanh(10.0)) * float(jnp.cos(1.0)))
    assert memory_maps._largest_growth > 0  # XLA:CPU mapped the program's kernels


def test_far_from_the_limit_the_maps_are_not_read(monkeypatch):
    """Reading /proc/self/maps costs ~1 us a map: below half the limit (by the estimate) it is skipped, and the
    programs built meanwhile count in the next estimate."""
    reads = []  # each read reports 100 maps more than the last (this process's real count does not matter here)
    monkeypatch.setattr(memory_maps, "maps_in_use", lambda: reads.append(1) or 1_000 + 100 * len(reads))
    monkeypatch.setattr(memory_maps, "_measured", memory_maps.MEASURED_PROGRAMS)
    monkeypatch.setattr(memory_maps, "_largest_growth", 0)
    monkeypatch.setattr(memory_maps, "_last_used", 1_000)
    monkeypatch.setattr(memory_maps, "_since_read", 0)
    monkeypatch.setattr(memory_maps, "map_limit", lambda: 100_000)
    for _ in range(5):
        with memory_maps.tracking("a program"):
            pass
    assert reads == [] and memory_maps._since_read == 5
    monkeypatch.setattr(memory_maps, "map_limit", lambda: 2 * (1_000 + 6 * memory_maps.FIRST_ESTIMATE))
    with memory_maps.tracking("a program"):  # the estimate reaches half the limit: counted again
        pass
    assert len(reads) == 1 and memory_maps._since_read == 1  # read before it, then it counts
