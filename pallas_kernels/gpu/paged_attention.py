"""Paged decode attention for NVIDIA Hopper (Mosaic GPU): the one-token-per-sequence ragged kernel.

Work split
----------
Sequence b's token is row b of the ragged kernel, so a program owns one KV head and ``bq`` consecutive
sequences (``bq * G`` = 64 query rows: one ``wgmma`` tile, all G heads of the KV head sharing each K/V tile).
Decode batches are small next to the machine, so the context is split Flash-Decoding style: ``num_splits``
programs per (block of sequences, KV head) each stream a slice of every sequence's pages through the TMA ring
and write a partial output with its log-sum-exp, and a short XLA combine merges them. ``tuning.paged_blocks``
picks the split count so that about two programs per SM are in flight. Partial pages at the end of a context
are masked per key; int8 / fp8 pages carry per-(kv head, token) scales (see ``ragged_paged_attention``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gpu import tuning
from pallas_kernels.gpu.ragged_paged_attention import ragged_paged_attention


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "logit_soft_cap",
        "interpret",
        "block_b",
        "pages_per_block",
        "num_splits",
        "stages",
    ),
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
    stages: int | None = None,
) -> jax.Array:
    """Decode attention (semantics: ``reference.paged_attention``). q [B, N, H] -> [B, N, H]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    defaults = tuning.paged_blocks(
        num_heads // num_kv_heads,
        page_size,
        head_dim,
        jnp.dtype(k_pages.dtype).itemsize,
        num_tokens=batch,
        num_kv_heads=num_kv_heads,
        max_pages_per_seq=block_tables.shape[1],
    )
    return ragged_paged_attention(
        q,
        k_pages,
        v_pages,
        lengths,
        block_tables,
        jnp.arange(batch + 1, dtype=jnp.int32),
        jnp.array([batch], dtype=jnp.int32),
        sm_scale=sm_scale,
        k_scales=k_scales,
        v_scales=v_scales,
        logit_soft_cap=logit_soft_cap,
        interpret=interpret,
        block_q=block_b or defaults.q_tokens,
        pages_per_block=pages_per_block,
        num_splits=num_splits or defaults.num_splits,
        stages=stages,
    )
