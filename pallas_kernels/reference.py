"""Plain-jnp ground truth for every kernel in this package (docs/kernels.md).

These functions define the semantics the Pallas kernels must match. They favour clarity over speed but avoid
materialising repeated K/V for GQA: queries are grouped as [.., K, G, H] against K/V of [.., K, H].
Scores and softmax are computed in float32 whatever the input dtype.

Dimension letters: B batch, T tokens, S key positions, N query heads, K kv heads, G = N/K, H head_dim,
P pages, L page size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _softcap(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    if soft_cap is None:
        return scores
    return soft_cap * jnp.tanh(scores / soft_cap)


BF16_BITS = jnp.dtype(jnp.uint16)
"""Pages of this dtype hold bfloat16 values as their bits. XLA:CPU has no bfloat16 scatter: writing one token
into a bf16 page pool converted the whole pool to float32 and back (52 ms vs 0.03 ms per layer for the 159M
model's pool), while a uint16 scatter is in place. Readers widen the bits straight to float32."""


def pages_to_float32(pages: jax.Array) -> jax.Array:
    """A tile of pages in float32: a plain conversion, or for BF16_BITS pages their bits as a float32's upper
    half (exactly the bfloat16 value; one elementwise op that fuses into the gather)."""
    if pages.dtype == BF16_BITS:
        return jax.lax.bitcast_convert_type(pages.astype(jnp.uint32) << 16, jnp.float32)
    return pages.astype(jnp.float32)


def pages_as_float(pages: jax.Array) -> jax.Array:
    """Pages in a float dtype the kernels take: BF16_BITS pages as bfloat16 (a copy), others unchanged."""
    if pages.dtype == BF16_BITS:
        return jax.lax.bitcast_convert_type(pages, jnp.bfloat16)
    return pages


def _to_page_dtype(x: jax.Array, dtype) -> jax.Array:
    if jnp.dtype(dtype) == BF16_BITS:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
    return x.astype(dtype)


def _dequantize(pages: jax.Array, scales: jax.Array | None) -> jax.Array:
    """int8 / fp8 pages [K, P, L, H] with one scale per (kv head, token slot) [K, P, L] -> float32."""
    if scales is None:
        return pages_to_float32(pages)
    return pages.astype(jnp.float32) * scales[..., None].astype(jnp.float32)


def _masked_softmax_attend(scores: jax.Array, mask: jax.Array, values: jax.Array, eq: str) -> jax.Array:
    """Softmax over the last axis of scores (masked), then weighted sum of values with einsum ``eq``.

    Rows with no visible key give zeros rather than NaN.
    """
    scores = jnp.where(mask, scores, _MASK_VALUE)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom == 0.0, 1.0, denom)
    return jnp.einsum(eq, probs, values.astype(jnp.float32))


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    sm_scale: float | None = None,
    segment_ids: jax.Array | None = None,
    logit_soft_cap: float | None = None,
) -> jax.Array:
    """Dense attention. q [B, Tq, N, H]; k, v [B, Tk, K, H]; segment_ids [B, Tq] (q and kv share them when Tq == Tk).

    Causal alignment is bottom-right (the last query sees the last key), so Tq < Tk models a chunk at the end.
    A query attends to key j when j <= i (causal), i - j < sliding_window, and segments match.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32)) * scale
    scores = _softcap(scores, logit_soft_cap)
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k_pos = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((q_len, kv_len), dtype=bool)
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    mask = jnp.broadcast_to(mask, (batch, q_len, kv_len))
    if segment_ids is not None:
        kv_segments = segment_ids if kv_len == q_len else segment_ids[:, -kv_len:]
        mask &= segment_ids[:, :, None] == kv_segments[:, None, :]
    out = _masked_softmax_attend(scores, mask[:, None, None], v, "bkgts,bskh->btkgh")
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


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
    """The engine's mixed step: packed new tokens of many sequences against their paged K/V.

    q [T, N, H]; k_pages, v_pages [K, P, L, H]; kv_lens [S]; block_tables [S, Pmax]; cu_q_lens [S + 1];
    num_seqs [1]. Token t of sequence i (cu_q_lens[i] <= t < cu_q_lens[i+1]) sits at position
    kv_lens[i] - q_len_i + (t - cu_q_lens[i]) and sees keys at positions <= its own. Rows past
    cu_q_lens[num_seqs] are padding and come back as zeros.

    NOTE: each token gathers its sequence's pages ([T, S, K, H] in memory): fine as a reference and for the
    small CPU engine, while the Pallas kernels stream pages instead.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if sm_scale is None else sm_scale

    token_idx = jnp.arange(num_tokens)
    seq_of_token = jnp.clip(jnp.searchsorted(cu_q_lens, token_idx, side="right") - 1, 0, block_tables.shape[0] - 1)
    is_real = token_idx < cu_q_lens[num_seqs[0]]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    seq_kv_len = kv_lens[seq_of_token]
    q_pos = seq_kv_len - q_lens[seq_of_token] + (token_idx - cu_q_lens[seq_of_token])  # [T]

    pages = block_tables[seq_of_token]  # [T, Pmax]
    k = _dequantize(k_pages, k_scales)[:, pages]  # [K, T, Pmax, L, H]
    v = _dequantize(v_pages, v_scales)[:, pages]
    k = k.reshape(num_kv_heads, num_tokens, max_pages * page_size, head_dim)
    v = v.reshape(num_kv_heads, num_tokens, max_pages * page_size, head_dim)

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgh,ktsh->tkgs", qg, k.astype(jnp.float32)) * scale
    scores = _softcap(scores, logit_soft_cap)
    k_pos = jnp.arange(max_pages * page_size)[None, :]
    mask = (k_pos <= q_pos[:, None]) & (k_pos < seq_kv_len[:, None]) & is_real[:, None]
    if sliding_window is not None:
        mask &= q_pos[:, None] - k_pos < sliding_window
    out = _masked_softmax_attend(scores, mask[:, None, None, :], v, "tkgs,ktsh->tkgh")
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


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
) -> jax.Array:
    """Decode: one new token per sequence. q [B, N, H]; lengths [B] include that token; -> [B, N, H]."""
    batch = q.shape[0]
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
    )


def absmax_quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """x [..., H] -> (values [..., H] int8 / e4m3, float32 scales [...]): one scale per vector along the last
    axis, its absmax mapped to 127 / 448. New K/V [T, K, H] get one scale per token and head, fixed when the
    token is written, so a page that fills over many steps never rescales old tokens."""
    x32 = x.astype(jnp.float32)
    qmax = 127.0 if jnp.dtype(dtype) == jnp.int8 else float(jnp.finfo(dtype).max)
    scale = jnp.max(jnp.abs(x32), axis=-1) / qmax
    scale = jnp.where(scale > 0, scale, 1.0)
    scaled = x32 / scale[..., None]
    if jnp.dtype(dtype) == jnp.int8:
        scaled = jnp.round(scaled)
    return jnp.clip(scaled, -qmax, qmax).astype(dtype), scale


def write_to_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
):
    """Scatter new K/V [T, K, H] into pages [K, P, L, H] at flat slots (page * L + offset).

    With scales [K, P, L] the pages are quantized (int8 / fp8): each new token is quantized per head and its
    scale stored in the same slot; returns (k_pages, v_pages, k_scales, v_scales) then, else (k_pages, v_pages).
    Padding tokens carry slot 0..L-1 of the null page 0, which no real sequence reads.
    """
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    page = slot_mapping // page_size
    offset = slot_mapping % page_size
    if k_scales is not None:
        k, k_scale = absmax_quantize(k, k_pages.dtype)
        v, v_scale = absmax_quantize(v, v_pages.dtype)
        k_scales = k_scales.at[:, page, offset].set(k_scale.T)
        v_scales = v_scales.at[:, page, offset].set(v_scale.T)
    k_pages = k_pages.at[:, page, offset].set(_to_page_dtype(jnp.swapaxes(k, 0, 1), k_pages.dtype))
    v_pages = v_pages.at[:, page, offset].set(_to_page_dtype(jnp.swapaxes(v, 0, 1), v_pages.dtype))
    if k_scales is not None:
        return k_pages, v_pages, k_scales, v_scales
    return k_pages, v_pages
