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
    compiled = compile_lowered(_lowered(2))
    assert float(compiled(jnp.ones((8, 8)))[0]) == pytest.approx(8 * float(jnp.tanh(10.0)) * float(jnp.cos(1.0)))
    assert memory_maps._largest_growth > 0  # XLA:CPU mapped the program's kernels
