"""What every attention backend shares: the backend-neutral layout of a step and the backend interface.

The engine's batch builder produces an :class:`AttentionLayout` (numpy, on the host). The backend chosen at
startup turns it into its own metadata with ``plan(layout)`` (host side, once per step, for all layers), and the
model calls ``backend.attend(q, kv, metadata, sm_scale=..., sliding_window=..., soft_cap=...)`` in every layer
(device side; the window and the logit soft cap are the layer's static constants); ``kv`` is the cache of all
the stage's layers, ``(k_pages, v_pages)``, or ``(k_pages, v_pages, k_scales, v_scales)`` for an int8 / fp8
cache, with layer-major page ids: layer j of the buffer owns pages [j * P, (j + 1) * P). The model hands each
layer ``for_layer(metadata, j * P)``, whose page ids point into that layer's pages (a traced offset when the
layers run in a loop). Metadata shapes depend only on the step's token bucket, so the backend never adds a
compiled program.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
from jax.sharding import Mesh

from jserve.engine.shapes import StepShapes
from pallas_kernels import reference


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionLayout:
    """Where each new token's K/V goes and what each sequence attends to, for one engine step.

    slot_mapping [T]: flat cache slot (page * page_size + offset) of each new token; padding -> null page 0.
    kv_lens [B]: tokens in cache per sequence row, this step's included. block_tables [B, Pmax]: page ids.
    cu_q_lens [B + 1]: row i owns tokens cu_q_lens[i]:cu_q_lens[i+1]. num_seqs [1]: real rows.
    """

    slot_mapping: jax.Array
    kv_lens: jax.Array
    block_tables: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array


def offset_layout(layout: AttentionLayout, page_offset: jax.Array | int, page_size: int) -> AttentionLayout:
    """``layout`` with its slots and block tables moved ``page_offset`` pages on."""
    return dataclasses.replace(
        layout,
        slot_mapping=layout.slot_mapping + page_offset * page_size,
        block_tables=layout.block_tables + page_offset,
    )


class AttentionBackend:
    """One attention path. Subclasses set ``name`` and implement ``attend``; ``plan`` defaults to the layout."""

    name = "base"

    def __init__(self, shapes: StepShapes, *, mesh: Mesh | None = None):
        """``shapes``: the engine's step shapes (rows, block-table width, page size) that plans are padded to."""
        self.shapes = shapes
        self.mesh = mesh

    def with_mesh(self, mesh: Mesh | None) -> AttentionBackend:
        """The same backend for one pipeline stage's devices (Pallas kernels run per device under shard_map)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__, mesh=mesh)
        return clone

    def plan(self, layout: AttentionLayout):
        """Host side: this backend's metadata for one step (numpy pytree; shapes fixed per token bucket)."""
        return layout

    def plan_short(self, layout: AttentionLayout):
        """``plan`` for a step whose rows all hold a few query tokens (speculative drafting and verification):
        the path that serves those best (default: ``plan``'s own choice)."""
        return self.plan(layout)

    def alternative(self, metadata):
        """The same metadata taking the backend's other runtime path, if it has one (warm-up runs both)."""
        return metadata

    def layout_of(self, metadata) -> AttentionLayout:
        return metadata

    def with_layout(self, metadata, layout: AttentionLayout):
        """``metadata`` with its layout replaced: chained verification moves a row's positions in a short step's
        metadata on the device (jserve.speculative.chain), which every backend's ``plan_short`` keeps a layout."""
        return layout

    def for_layer(self, metadata, page_offset: jax.Array | int):
        """The metadata with every page id moved ``page_offset`` pages on: one layer's pages in the stacked cache.
        (Page 0 of each layer is that layer's null page, so padding stays on a null page.)"""
        return offset_layout(metadata, page_offset, self.shapes.page_size)

    def write_kv(self, kv: tuple[jax.Array, ...], k: jax.Array, v: jax.Array, metadata) -> tuple[jax.Array, ...]:
        """Scatters this step's K/V [T, K, H] into the layer's pages [K, P, L, H] (quantizing them per token and
        head when the cache has scales)."""
        return reference.write_to_pages(kv[0], kv[1], k, v, self.layout_of(metadata).slot_mapping, *kv[2:])

    def attend(
        self,
        q: jax.Array,
        kv: tuple[jax.Array, ...],
        metadata,
        *,
        sm_scale: float,
        sliding_window: int | None,
        soft_cap: float | None = None,
    ) -> jax.Array:
        """q [T, N, H] against the paged cache (this step's K/V already written) -> [T, N, H].

        ``sliding_window``: a query sees keys less than this many positions back (None: all). ``soft_cap``:
        scores become ``soft_cap * tanh(scores / soft_cap)`` after ``sm_scale`` (Gemma 2's logit soft-capping).
        """
        raise NotImplementedError

    @staticmethod
    def scales(kv: tuple[jax.Array, ...]) -> dict:
        """The kernels' ``k_scales`` / ``v_scales`` keywords for a layer's cache (None when unquantized)."""
        return dict(k_scales=kv[2], v_scales=kv[3]) if len(kv) == 4 else dict(k_scales=None, v_scales=None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
