"""XLA work items: the host cuts each step into (query block, page run) items (``pallas_kernels/xla_items.py``).

``plan`` applies the kernel's own selection rule (``prefer_items``): items for every step holding a multi-token
sequence (6-10x faster than the page loop there) and for decode-only steps whose contexts are ragged enough;
the page loop otherwise. The choice travels as a runtime flag and both paths live in one program
(``lax.cond``), and the plan is padded to sizes fixed per token bucket (``fixed_plan_sizes``), so planning
never picks a new program. Work items skip pages for one sliding window, so the backend serves models whose
layers share one window.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import numpy as np

from jserve.attention.base import AttentionBackend, AttentionLayout
from jserve.attention.xla_page_loop import page_loop
from jserve.engine.shapes import StepShapes
from pallas_kernels.xla_items import (
    WorkPlan,
    fixed_plan_sizes,
    plan_work,
    prefer_items,
    ragged_paged_attention_items,
)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class WorkItemsMetadata:
    layout: AttentionLayout
    use_items: jax.Array  # [] bool: this step runs the work-item kernel (else the page loop)
    work: WorkPlan


class XlaWorkItemsBackend(AttentionBackend):
    name = "xla-work-items"

    def __init__(self, shapes: StepShapes, *, sliding_window: int | None, mesh=None):
        super().__init__(shapes, mesh=mesh)
        self.sliding_window = sliding_window

    def _sizes(self, num_tokens: int):
        s = self.shapes
        return fixed_plan_sizes(num_tokens, s.max_num_seqs, s.max_pages_per_seq, s.page_size)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one backend per engine, a handful of token buckets
    def _empty_plan(self, num_tokens: int) -> WorkPlan:
        s = self.shapes
        return plan_work(
            np.zeros(s.max_num_seqs, np.int32),
            np.zeros(s.max_num_seqs + 1, np.int32),
            0,
            np.zeros((s.max_num_seqs, 1), np.int32),
            page_size=s.page_size,
            num_tokens=num_tokens,
            q_block=16,
            sliding_window=self.sliding_window,
            fixed_sizes=self._sizes(num_tokens),
        )

    def plan(self, layout: AttentionLayout) -> WorkItemsMetadata:
        num_tokens = layout.slot_mapping.shape[0]
        n = int(layout.num_seqs[0])
        q_lens = np.diff(layout.cu_q_lens[: n + 1])
        use = prefer_items(q_lens, layout.kv_lens[:n], num_tokens=num_tokens, page_size=self.shapes.page_size)
        if not use:
            work = self._empty_plan(num_tokens)
        else:
            work = plan_work(
                layout.kv_lens,
                layout.cu_q_lens,
                n,
                layout.block_tables,
                page_size=self.shapes.page_size,
                num_tokens=num_tokens,
                q_block=16,  # decode-only steps put every row in the one-row group anyway
                sliding_window=self.sliding_window,
                fixed_sizes=self._sizes(num_tokens),
            )
        return WorkItemsMetadata(layout, np.asarray(use), work)

    def plan_short(self, layout: AttentionLayout) -> WorkItemsMetadata:
        """The page loop: for a handful of rows of 1-8 tokens it measured 1.3-1.8x faster than work items on
        the 2-core CPU (the items' fixed per-call cost dominates; docs/speculative.md)."""
        num_tokens = layout.slot_mapping.shape[0]
        return WorkItemsMetadata(layout, np.asarray(False), self._empty_plan(num_tokens))

    def alternative(self, metadata: WorkItemsMetadata) -> WorkItemsMetadata:
        return dataclasses.replace(metadata, use_items=np.logical_not(metadata.use_items))

    def layout_of(self, metadata: WorkItemsMetadata) -> AttentionLayout:
        return metadata.layout

    def attend(self, q, kv, metadata: WorkItemsMetadata, *, sm_scale, sliding_window):
        def items(q, kv, m):
            return ragged_paged_attention_items(
                q, kv[0], kv[1], m.work, sm_scale=sm_scale, sliding_window=sliding_window, **self.scales(kv)
            )

        def loop(q, kv, m):
            return page_loop(q, kv, m.layout, sm_scale=sm_scale, sliding_window=sliding_window)

        return jax.lax.cond(metadata.use_items, items, loop, q, kv, metadata)
