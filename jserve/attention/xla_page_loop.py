"""XLA page loop: every token row walks its context in 64-key steps (``pallas_kernels/xla.py``).

The loop's trip count is a runtime value (the longest context in the step), so one program serves every page
count. Used where work items cannot be: models whose layers have different sliding windows.
"""

from __future__ import annotations

import jax

from jserve.attention.base import AttentionBackend, AttentionLayout
from pallas_kernels import xla as pallas_xla


def page_loop(q, kv, layout: AttentionLayout, *, sm_scale, sliding_window) -> jax.Array:
    return pallas_xla.ragged_paged_attention(
        q,
        kv[0],
        kv[1],
        layout.kv_lens,
        layout.block_tables,
        layout.cu_q_lens,
        layout.num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        **AttentionBackend.scales(kv),
    )


class XlaPageLoopBackend(AttentionBackend):
    name = "xla-page-loop"

    def attend(self, q, kv, metadata, *, sm_scale, sliding_window):
        return page_loop(q, kv, metadata, sm_scale=sm_scale, sliding_window=sliding_window)
