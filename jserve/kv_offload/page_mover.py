"""Copies KV pages between a runner's device buffers and host rows, with programs built before ready.

Each pipeline stage has a gather and a scatter program per bucketed page count (``transfer.transfer_buckets``);
the runner builds them with its step programs (``tasks``) and the copies only ever call them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jserve.kv_offload.host_tier import BufferLayout
from jserve.kv_offload.transfer import (
    gather_pages,
    padded_ids,
    page_layout,
    scatter_pages,
    split_into_buckets,
    transfer_buckets,
)

ProgramFor = Callable[[dict, object, object, tuple, str], object]
"""``ModelRunner.program_for``: (programs, key, fn, args, what) -> the compiled program."""


def _page_sharding(buffer_sharding: NamedSharding, buffer_ndim: int) -> NamedSharding:
    """Pages ``[n, kv_heads, layers, ...]`` of a ``buffer_ndim``-d buffer, split like its kv heads (and
    trailing axes)."""
    spec = tuple(buffer_sharding.spec) + (None,) * (buffer_ndim - len(tuple(buffer_sharding.spec)))
    return NamedSharding(buffer_sharding.mesh, PartitionSpec(None, spec[0], None, *spec[2:]))


class PageMover:
    """Gathers pages out of every stage's KV buffers and scatters host rows back in (see the module docstring)."""

    def __init__(self, stages: Sequence, num_pages: int, max_pages: int) -> None:
        self.stages = stages  # the runner's _Stage objects: their kv_cache is read and replaced here
        self.buckets = transfer_buckets(max_pages)
        self.programs: dict[tuple[str, int, int], object] = {}  # (kind, stage, bucket) -> compiled
        self._gather = []
        self._scatter = []
        for stage in stages:
            static = {"num_layers": len(stage.layers), "num_pages": num_pages}
            self._gather.append(jax.jit(functools.partial(gather_pages, **static)))
            shardings = tuple(self._buffer_shardings(stage))
            self._scatter.append(
                jax.jit(functools.partial(scatter_pages, **static), donate_argnums=(0,), out_shardings=shardings)
            )

    @staticmethod
    def _buffer_shardings(stage) -> list[NamedSharding]:
        return [stage.kv_sharding if a.ndim == 4 else stage.kv_scale_sharding for a in stage.kv_cache]

    @staticmethod
    def _stage_layouts(stage) -> list[BufferLayout]:
        return [BufferLayout(page_layout(a.shape, len(stage.layers)), np.dtype(a.dtype)) for a in stage.kv_cache]

    def layouts(self) -> list[BufferLayout]:
        """One host page's layout per buffer, stage by stage (the host tier's pools)."""
        return [layout for stage in self.stages for layout in self._stage_layouts(stage)]

    # ---- programs --------------------------------------------------------------------------------
    def _args(self, s: int, bucket: int, kind: str) -> tuple:
        stage = self.stages[s]
        shardings = self._buffer_shardings(stage)
        kv = tuple(
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh) for a, sh in zip(stage.kv_cache, shardings, strict=True)
        )
        ids = jax.ShapeDtypeStruct((bucket,), np.int32)
        if kind == "gather":
            return (kv, ids)
        data = tuple(
            jax.ShapeDtypeStruct((bucket, *layout.shape), layout.dtype, sharding=_page_sharding(sh, len(layout.shape)))
            for layout, sh in zip(self._stage_layouts(stage), shardings, strict=True)
        )
        return (kv, ids, data)

    def tasks(self) -> list[tuple]:
        """(fn, programs, key, abstract args) of every copy program not built yet."""
        tasks = []
        for s in range(len(self.stages)):
            for bucket in self.buckets:
                for kind, fns in (("gather", self._gather), ("scatter", self._scatter)):
                    if (kind, s, bucket) not in self.programs:
                        tasks.append((fns[s], self.programs, (kind, s, bucket), self._args(s, bucket, kind)))
        return tasks

    @property
    def num_programs(self) -> int:
        return 2 * len(self.stages) * len(self.buckets)

    # ---- copies ----------------------------------------------------------------------------------
    def gather(self, pages: list[int], program_for: ProgramFor) -> list[tuple[int, list[jax.Array]]]:
        """Queues the copy of device ``pages`` out of the buffers; per call, (pages it holds, one array per
        buffer, stage by stage, each ``[bucket, ...]`` with the real pages first)."""
        calls = []
        for start, bucket in split_into_buckets(len(pages), self.buckets):
            chunk = pages[start : start + bucket]
            ids = padded_ids(chunk, bucket)
            arrays: list[jax.Array] = []
            for s, stage in enumerate(self.stages):
                args = (stage.kv_cache, ids)
                program = program_for(self.programs, ("gather", s, bucket), self._gather[s], args, "KV page gather")
                arrays.extend(program(*args))
            calls.append((len(chunk), arrays))
        return calls

    def scatter(self, pages: list[int], pools: list[np.ndarray], rows: list[int], program_for: ProgramFor) -> None:
        """Queues the copy of host rows ``rows`` of ``pools`` (one pool per buffer, stage by stage) into device
        ``pages``; the steps dispatched after it read them."""
        for start, bucket in split_into_buckets(len(pages), self.buckets):
            chunk = pages[start : start + bucket]
            ids = padded_ids(chunk, bucket)
            b = 0
            for s, stage in enumerate(self.stages):
                data = []
                for buffer, sharding in zip(stage.kv_cache, self._buffer_shardings(stage), strict=True):
                    pool = pools[b]
                    padded = np.zeros((bucket, *pool.shape[1:]), pool.dtype)
                    np.take(pool, rows[start : start + len(chunk)], axis=0, out=padded[: len(chunk)])
                    data.append(jax.device_put(padded, _page_sharding(sharding, buffer.ndim)))
                    b += 1
                args = (stage.kv_cache, ids, tuple(data))
                program = program_for(self.programs, ("scatter", s, bucket), self._scatter[s], args, "KV page scatter")
                stage.kv_cache = program(*args)
