"""Block sizes for the Mosaic GPU kernels (Hopper), kept apart from the kernel code.

Constraints the kernels assert: a program's query rows ``M = group * q_tokens`` are a multiple of 64 (one
``wgmma`` M-tile per warpgroup), ``q_tokens`` is a multiple of 8 (the SMEM tile height), the keys per step are
a multiple of 64 (the swizzled K-dimension of the P @ V product) and at most 256 (the ``wgmma`` N limit of Q @
K^T). Untuned defaults: no GPU was available when they were written; ``scripts/benchmark_kernels.py`` measures
them.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class GpuBlocks(NamedTuple):
    q_tokens: int  # tokens per program (rows = q_tokens * group)
    kv: int  # keys per pipeline step (= pages_per_block * page_size for paged kernels)
    stages: int  # pipeline depth: K/V steps in flight
    num_splits: int = 1  # split-K programs per sequence (paged kernels only)


def q_tokens_for_group(group: int, rows: int = 64) -> int:
    """Smallest token count (multiple of 8) whose ``group * tokens`` rows fill whole 64-row wgmma tiles."""
    tokens = max(8, rows // math.gcd(group, rows))
    while (tokens * group) % 64:
        tokens += 8
    return tokens


SMEM_BUDGET = 200 * 1024  # of the 227 KiB a Hopper CTA may use, leaving room for barriers and alignment


def _stages(fixed_bytes: int, per_stage_bytes: int, most: int = 4) -> int:
    return max(2, min(most, (SMEM_BUDGET - fixed_bytes) // per_stage_bytes))


def flash_blocks(q_len: int, kv_len: int, group: int, head_dim: int, dtype_bytes: int) -> GpuBlocks:
    # One warpgroup per program: 64 rows keep S [64, kv] and acc [64, H] in registers without spilling.
    kv = 128 if head_dim <= 128 else 64
    q_tokens = q_tokens_for_group(group)
    rows = q_tokens * group
    fixed = rows * head_dim * (2 + (dtype_bytes if dtype_bytes != 2 else 0))  # q tile (+ separate out tile)
    return GpuBlocks(q_tokens, kv, _stages(fixed, 2 * kv * head_dim * 2))


def paged_blocks(
    group: int,
    page_size: int,
    head_dim: int,
    page_bytes: int,
    num_tokens: int | None = None,
    num_kv_heads: int = 1,
    max_pages_per_seq: int = 1,
) -> GpuBlocks:
    """Ragged and decode steps of ``num_tokens`` query tokens (decode: one per sequence; None: never split);
    64 keys per step whatever the page size."""
    kv = max(64, page_size)
    q_tokens = q_tokens_for_group(group)
    rows = q_tokens * group
    splits = 1
    if num_tokens is not None:
        # Flash-Decoding: aim for >= 2 programs per SM (132 SMs on H100) when the query blocks alone cannot
        # (decode of a few sequences, short chunks over long contexts); large steps keep splits = 1.
        programs = num_kv_heads * -(-num_tokens // q_tokens)
        steps = -(-max_pages_per_seq * page_size // kv)
        splits = max(1, min(steps, 264 // max(programs, 1), 16))
    fixed = rows * head_dim * (2 + 4)  # q tile + an fp32 output tile (split-K partials)
    per_stage = 2 * kv * head_dim * (2 + (page_bytes if page_bytes != 2 else 0))  # K and V (+ staging)
    if page_bytes == 1:  # int8 / fp8 pages carry float32 scale rows, one per key, for K and V
        per_stage += 2 * kv * 4
    return GpuBlocks(q_tokens, kv, _stages(fixed, per_stage), splits)
