"""XLA page loop: every token row walks its context in 64-key steps (``pallas_kernels/xla.py``).

The loop's trip count is a runtime value (the longest context in the step), so one program serves every page
count, and the window is applied by masking alone (no host plan), so any mix of per-layer windows works. It is
the runtime fallback inside ``XlaWorkItemsBackend`` (decode-only steps with near-uniform contexts, short
speculative steps) and stays a backend of its own for tests and benchmarks.
"""

from __future__ import annotations

import jax

from jserve.attention.base import AttentionBackend, AttentionLayout
from pallas_kernels import xla as pallas_xla


def page_loop(
    q: jax.Array,
    kv: tuple[jax.Array, ...],
    layout: AttentionLayout,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None = None,
) -> jax.Array:
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
        logit_soft_cap=soft_cap,
        **AttentionBackend.scales(kv),
    )


class XlaPageLoopBackend(AttentionBackend):
    name = "xla-page-loop"

    def attend(self, q, kv, metadata, *, sm_scale, sliding_window, soft_cap=None):
        return page_loop(q, kv, metadata, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
