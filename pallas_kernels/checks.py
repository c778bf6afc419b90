"""Argument rules every platform kernel shares (the contract of ``reference.py``), checked in one place."""

from __future__ import annotations

from typing import Any

GPU_MIN_COPY_BYTES = 128  # Mosaic GPU splits a copy's barrier accounting over the 128 threads of a warpgroup
GPU_MIN_QUANTIZED_PAGE_SIZE = GPU_MIN_COPY_BYTES // 4  # a page's float32 scale row is one copy


def check_attention_args(
    num_heads: int,
    num_kv_heads: int,
    sliding_window: int | None,
    *,
    k_scales: Any = None,
    v_scales: Any = None,
    segment_ids: Any = None,
    q_len: int = 0,
    kv_len: int = 0,
) -> int:
    """Raises ValueError for arguments no kernel accepts; returns the GQA group (query heads per KV head)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales go together")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if segment_ids is not None and kv_len > q_len:
        raise ValueError("segment_ids with kv_len > q_len: the key segments are not defined")
    return num_heads // num_kv_heads
