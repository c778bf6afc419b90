"""Paged decode attention for TPU: the one-token-per-sequence special case of the ragged kernel.

Work split
----------
Sequence b's single query token is row block b of the ragged kernel, so a program owns one KV head and 8
consecutive sequences (``tuning.decode_blocks``): its rows are the 8 * G query heads of that KV head, and each
sequence's pages are streamed through the double-buffered DMA loop in turn. When the grid would be too small
to keep both TensorCores of a megacore chip busy (few sequences, long contexts), the context is split
Flash-Decoding style (``num_splits``) and the partial results are merged by their log-sum-exp in the wrapper.
See ``ragged_paged_attention`` for the kernel itself (int8 / fp8 pages with per-token scales included)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.tpu import tuning
from pallas_kernels.tpu.ragged_paged_attention import ragged_paged_attention


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "logit_soft_cap", "interpret", "block_b", "pages_per_block", "num_splits"),
)
def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    logit_soft_cap: float | None = None,
    interpret: bool = False,
    block_b: int | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
) -> jax.Array:
    """Decode attention (semantics: ``reference.paged_attention``). q [B, N, H] -> [B, N, H]."""
    batch = q.shape[0]
    num_kv_heads, _, page_size, _ = k_pages.shape
    defaults = tuning.decode_blocks(batch, num_kv_heads, page_size, block_tables.shape[1])
    cu_q_lens = jnp.arange(batch + 1, dtype=jnp.int32)
    num_seqs = jnp.array([batch], dtype=jnp.int32)
    return ragged_paged_attention(
        q,
        k_pages,
        v_pages,
        lengths,
        block_tables,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        k_scales=k_scales,
        v_scales=v_scales,
        logit_soft_cap=logit_soft_cap,
        interpret=interpret,
        block_q=block_b or defaults.q_tokens,
        pages_per_block=pages_per_block or defaults.pages_per_block,
        num_splits=num_splits or defaults.num_splits,
    )
