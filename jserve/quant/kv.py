"""Quantized KV cache: int8 / fp8 (e4m3) pages with one float32 scale per (kv head, token slot).

Why per token and head: a page fills over many decode steps. A per-page scale would be fixed by the first
token written (later, larger values clip) or need every earlier token of the page rescaled on each write.
A per-token scale is computed once, when the token's K/V is written (``pallas_kernels.reference.absmax_quantize``),
and costs 4 bytes per head_dim values (6% at head_dim 64). Attention multiplies scores by the K scales and
probabilities by the V scales, so quantized tiles are only converted, never rescaled.
"""

from __future__ import annotations

import jax.numpy as jnp

SCALE_DTYPE = jnp.float32


def is_quantized_kv(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    """K and V bytes of one token over all layers, scales included."""
    per_head = head_dim * jnp.dtype(dtype).itemsize
    if is_quantized_kv(dtype):
        per_head += jnp.dtype(SCALE_DTYPE).itemsize
    return 2 * num_layers * num_kv_heads * per_head
