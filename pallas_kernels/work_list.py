"""The (sequence, KV block) work list one ragged-attention program walks; shared by the GPU and TPU kernels.

A program owns a window of query rows [t0, t_end) and, with split-K, one of ``num_splits`` shares of each
sequence's KV blocks. Its work is the flat list of (sequence, block) pairs it must visit, in order, so a kernel
can prefetch the next pair's pages (possibly the next sequence's first block) while computing the current one.
Everything here runs inside a kernel on scalars read from refs (SMEM on TPU, GMEM/SMEM on GPU).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def kv_work_list(
    *,
    cu_q_lens_ref,
    kv_lens_ref,
    num_seqs,
    t0,
    t_end,
    block_kv: int,
    num_splits: int,
    split,
    sliding_window: int | None,
):
    """Returns ``(seq_info, first_item, next_item)``: ``seq_info(seq)`` is (q_start, q_end, context), the
    position of its first new token; ``first_item(seq)`` the first pair at or after ``seq``; ``next_item(seq,
    blk)`` the pair after it. A sequence of -1 means this program has no more work."""
    max_seqs = kv_lens_ref.shape[0]

    def seq_info(seq):
        seq = jnp.minimum(seq, max_seqs - 1)
        q_start = cu_q_lens_ref[seq]
        q_end = cu_q_lens_ref[seq + 1]
        return q_start, q_end, kv_lens_ref[seq] - (q_end - q_start)  # context: position of the 1st new token

    def seq_range(seq):
        """KV blocks [b0, b1) of ``seq`` that this program (query window, split) visits."""
        q_start, q_end, context = seq_info(seq)
        lo_tok = jnp.maximum(q_start, t0)
        hi_tok = jnp.minimum(q_end, t_end) - 1
        first_pos = context + lo_tok - q_start
        last_pos = context + hi_tok - q_start
        if sliding_window is None:
            first_key = jnp.int32(0)
        else:
            first_key = jnp.maximum(first_pos - sliding_window + 1, 0)
        blk_lo = first_key // block_kv
        n_blocks = jnp.where(hi_tok >= lo_tok, last_pos // block_kv - blk_lo + 1, 0)
        per_split = (n_blocks + num_splits - 1) // num_splits
        b0 = blk_lo + split * per_split
        return b0, jnp.minimum(b0 + per_split, blk_lo + n_blocks)

    def seq_overlaps(seq):
        return (seq < num_seqs) & (cu_q_lens_ref[jnp.minimum(seq, num_seqs)] < t_end)

    def first_item(seq):
        def empty(s):
            b0, b1 = seq_range(s)
            return seq_overlaps(s) & (b1 <= b0)

        seq = lax.while_loop(empty, lambda s: s + 1, seq)
        return jnp.where(seq_overlaps(seq), seq, -1), seq_range(seq)[0]

    def next_item(seq, blk):
        return lax.cond(blk + 1 < seq_range(seq)[1], lambda: (seq, blk + 1), lambda: first_item(seq + 1))

    return seq_info, first_item, next_item
