"""XLA work items: the host cuts each step into (query block, page run) items (``pallas_kernels/xla_items.py``).

``plan`` applies the kernel's own selection rule (``prefer_items``): items for every step holding a multi-token
sequence (6-10x faster than the page loop there) and for decode-only steps whose contexts are ragged enough;
the page loop otherwise. The choice travels as one runtime flag for the step and both paths live in one
program (``lax.cond``), and every plan is padded to sizes fixed per token bucket (``fixed_plan_sizes``), so
planning never picks a new program.

A plan skips the pages before one sliding window, so the backend holds the model's distinct windows (Gemma 2/3
alternate sliding-window and global layers) and builds one plan per distinct window each step, all padded to
the same sizes; a layer's ``attend`` picks the plan of its own window, a static lookup since the window is the
layer's constant. Host planning grows with the number of distinct windows (two windows: about twice the
plan time of one).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from dataclasses import dataclass

import jax
import numpy as np

from jserve.attention.base import AttentionBackend, AttentionLayout, offset_layout
from jserve.attention.xla_page_loop import page_loop
from jserve.engine.shapes import StepShapes
from pallas_kernels.xla_items import (
    ItemSet,
    WorkPlan,
    fixed_plan_sizes,
    plan_work,
    prefer_items,
    ragged_paged_attention_items,
)

Q_BLOCK = 16  # decode-only steps put every row in the one-row group anyway


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class WorkItemsMetadata:
    layout: AttentionLayout
    use_items: jax.Array  # [] bool: this step runs the work-item kernel (else the page loop)
    plans: tuple[WorkPlan, ...]  # one per distinct window, in ``XlaWorkItemsBackend.sliding_windows`` order


def distinct_windows(windows: Iterable[int | None]) -> tuple[int | None, ...]:
    """The layers' windows deduplicated, first occurrence first (a stable order keeps the plan pytree fixed)."""
    return tuple(dict.fromkeys(windows)) or (None,)


class XlaWorkItemsBackend(AttentionBackend):
    name = "xla-work-items"

    def __init__(self, shapes: StepShapes, *, sliding_windows: Iterable[int | None] = (None,), mesh=None):
        """``sliding_windows``: the layers' windows (None: full attention); duplicates are dropped."""
        super().__init__(shapes, mesh=mesh)
        self.sliding_windows = distinct_windows(sliding_windows)

    def _sizes(self, num_tokens: int):
        s = self.shapes
        return fixed_plan_sizes(num_tokens, s.max_num_seqs, s.max_pages_per_seq, s.page_size)

    def _plan_windows(self, kv_lens, cu_q_lens, num_seqs: int, block_tables, num_tokens: int) -> tuple[WorkPlan, ...]:
        """One plan per distinct window, all padded to this token bucket's fixed sizes."""
        sizes = self._sizes(num_tokens)
        return tuple(
            plan_work(
                kv_lens,
                cu_q_lens,
                num_seqs,
                block_tables,
                page_size=self.shapes.page_size,
                num_tokens=num_tokens,
                q_block=Q_BLOCK,
                sliding_window=window,
                fixed_sizes=sizes,
            )
            for window in self.sliding_windows
        )

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one backend per engine, a handful of token buckets
    def _empty_plan(self, num_tokens: int) -> tuple[WorkPlan, ...]:
        s = self.shapes
        return self._plan_windows(
            np.zeros(s.max_num_seqs, np.int32),
            np.zeros(s.max_num_seqs + 1, np.int32),
            0,
            np.zeros((s.max_num_seqs, 1), np.int32),
            num_tokens,
        )

    def plan(self, layout: AttentionLayout) -> WorkItemsMetadata:
        num_tokens = layout.slot_mapping.shape[0]
        n = int(layout.num_seqs[0])
        q_lens = np.diff(layout.cu_q_lens[: n + 1])
        use = prefer_items(q_lens, layout.kv_lens[:n], num_tokens=num_tokens, page_size=self.shapes.page_size)
        if use:
            plans = self._plan_windows(layout.kv_lens, layout.cu_q_lens, n, layout.block_tables, num_tokens)
        else:
            plans = self._empty_plan(num_tokens)
        return WorkItemsMetadata(layout, np.asarray(use), plans)

    def plan_short(self, layout: AttentionLayout) -> WorkItemsMetadata:
        """The page loop: for a handful of rows of 1-8 tokens it measured 1.3-1.8x faster than work items on
        the 2-core CPU (the items' fixed per-call cost dominates; docs/speculative.md)."""
        num_tokens = layout.slot_mapping.shape[0]
        return WorkItemsMetadata(layout, np.asarray(False), self._empty_plan(num_tokens))

    def alternative(self, metadata: WorkItemsMetadata) -> WorkItemsMetadata:
        return dataclasses.replace(metadata, use_items=np.logical_not(metadata.use_items))

    def layout_of(self, metadata: WorkItemsMetadata) -> AttentionLayout:
        return metadata.layout

    def with_layout(self, metadata: WorkItemsMetadata, layout: AttentionLayout) -> WorkItemsMetadata:
        return dataclasses.replace(metadata, layout=layout)

    def for_layer(self, metadata: WorkItemsMetadata, page_offset) -> WorkItemsMetadata:
        def moved(items: ItemSet) -> ItemSet:
            return dataclasses.replace(items, item_pages=items.item_pages + page_offset)

        plans = tuple(
            dataclasses.replace(plan, decode=moved(plan.decode), chunks=moved(plan.chunks)) for plan in metadata.plans
        )
        layout = offset_layout(metadata.layout, page_offset, self.shapes.page_size)
        return dataclasses.replace(metadata, layout=layout, plans=plans)

    def plan_for(self, metadata: WorkItemsMetadata, sliding_window: int | None) -> WorkPlan:
        """The plan built for this layer's window (trace time: the window is a per-layer constant)."""
        if sliding_window not in self.sliding_windows:
            raise ValueError(
                f"sliding_window={sliding_window} was not planned for; this backend plans {self.sliding_windows}"
            )
        return metadata.plans[self.sliding_windows.index(sliding_window)]

    def attend(self, q, kv, metadata: WorkItemsMetadata, *, sm_scale, sliding_window, soft_cap=None):
        attention = dict(sm_scale=sm_scale, sliding_window=sliding_window)

        def items(q, kv, work, layout):
            return ragged_paged_attention_items(
                q, kv[0], kv[1], work, logit_soft_cap=soft_cap, **attention, **self.scales(kv)
            )

        def loop(q, kv, work, layout):
            return page_loop(q, kv, layout, soft_cap=soft_cap, **attention)

        work = self.plan_for(metadata, sliding_window)
        return jax.lax.cond(metadata.use_items, items, loop, q, kv, work, metadata.layout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sliding_windows={self.sliding_windows})"
