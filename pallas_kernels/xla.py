"""Ragged paged attention in plain XLA ops, blocked over pages: the engine's path where no Pallas kernel runs.

``reference.ragged_paged_attention`` gathers every token's whole context at once ([T, S, K, H] in memory). Here a
``fori_loop`` walks the context a few pages at a time (about ``KEYS_PER_STEP`` keys) with an online softmax
(running max, denominator and output), so each iteration touches a [K, T, keys, H] tile that stays in cache,
and pages that no token can see (past the longest context, or wholly before every token's sliding window) are
never visited. On the 2-core CPU this is 2-3x (decode) to 3.5x (512-token prefill) faster than the gather-all
reference; results agree to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import pages_to_float32

_NEG = -1e30
KEYS_PER_STEP = 64


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    logit_soft_cap: float | None = None,
) -> jax.Array:
    """Same contract as ``reference.ragged_paged_attention`` (see API.md "Kernels")."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale

    token = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, token, side="right") - 1, 0, block_tables.shape[0] - 1)
    is_real = token < cu_q_lens[num_seqs[0]]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    kv_len = jnp.where(is_real, kv_lens[seq], 0)
    q_pos = kv_len - q_lens[seq] + (token - cu_q_lens[seq])  # [T]
    pages_per_step = max(1, KEYS_PER_STEP // page_size)
    keys_per_step = pages_per_step * page_size
    pages = jnp.pad(block_tables[seq], ((0, 0), (0, pages_per_step)))  # [T, Pmax + pad]; pad -> null page
    qg = (q.astype(jnp.float32) * scale).reshape(num_tokens, num_kv_heads, group, head_dim)

    def load(pages_arr, scales, page_ids):  # page_ids [T, B] -> [K, T, B * L, H] float32
        tile = pages_to_float32(pages_arr[:, page_ids])
        if scales is not None:  # per-token scales [K, P, L]
            tile = tile * scales[:, page_ids][..., None].astype(jnp.float32)
        return tile.reshape(num_kv_heads, num_tokens, keys_per_step, head_dim)

    def body(i, carry):
        row_max, denom, acc = carry
        page_ids = jax.lax.dynamic_slice_in_dim(pages, i * pages_per_step, pages_per_step, axis=1)
        k = load(k_pages, k_scales, page_ids)
        v = load(v_pages, v_scales, page_ids)
        scores = jnp.einsum("tkgh,ktsh->tkgs", qg, k)
        if logit_soft_cap is not None:
            scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
        k_pos = i * keys_per_step + jnp.arange(keys_per_step)
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len[:, None])
        if sliding_window is not None:
            visible &= q_pos[:, None] - k_pos[None, :] < sliding_window
        scores = jnp.where(visible[:, None, None, :], scores, _NEG)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        correction = jnp.exp(row_max - new_max)
        probs = jnp.where(visible[:, None, None, :], jnp.exp(scores - new_max[..., None]), 0.0)
        denom = denom * correction + probs.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("tkgs,ktsh->tkgh", probs, v)
        return new_max, denom, acc

    shape = (num_tokens, num_kv_heads, group)
    init = (
        jnp.full(shape, _NEG, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, head_dim), jnp.float32),
    )
    last_step = (jnp.max(kv_len) + keys_per_step - 1) // keys_per_step
    first_step = 0
    if sliding_window is not None:
        earliest = jnp.min(jnp.where(is_real, q_pos - sliding_window + 1, jnp.iinfo(jnp.int32).max))
        first_step = jnp.clip(earliest // keys_per_step, 0, last_step)
    _, denom, acc = jax.lax.fori_loop(first_step, last_step, body, init)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
