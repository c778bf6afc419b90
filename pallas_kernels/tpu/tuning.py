"""Block sizes for the TPU kernels, kept apart from the kernel code.

Untuned defaults (no TPU was available to measure): the intent is 128-512 rows per MXU tile and KV blocks of a
few hundred keys, within a few MiB of VMEM. Tests pass explicit small sizes.
"""

from __future__ import annotations

from typing import NamedTuple


class RaggedBlocks(NamedTuple):
    q_tokens: int  # tokens per query block (rows per program = q_tokens * group), a multiple of 8
    pages_per_block: int  # KV pages fetched per inner step (keys per step = pages_per_block * page_size)
    num_splits: int  # programs sharing one sequence's KV range (split-K); 1 = no combine step


class FlashBlocks(NamedTuple):
    q_tokens: int  # query tokens per block (rows = q_tokens * group)
    kv: int  # keys per block


# keys per KV step, by page size: large enough to amortise the per-step softmax bookkeeping.
_KEYS_PER_STEP = {8: 128, 16: 256, 32: 256, 64: 512}


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def ragged_blocks(num_tokens: int, group: int, page_size: int, max_pages_per_seq: int) -> RaggedBlocks:
    """Mixed prefill/decode step: ~128 query rows per program."""
    q_tokens = max(8, _round_up(max(1, 128 // group), 8))
    q_tokens = min(q_tokens, _round_up(num_tokens, 8))
    pages = max(1, min(_KEYS_PER_STEP.get(page_size, 256) // page_size, max_pages_per_seq))
    return RaggedBlocks(q_tokens, pages, 1)


def decode_blocks(batch: int, num_kv_heads: int, page_size: int, max_pages_per_seq: int) -> RaggedBlocks:
    """Decode (one token per sequence): 8 sequences per program; split the context when the grid is small."""
    pages = max(1, min(_KEYS_PER_STEP.get(page_size, 256) // page_size, max_pages_per_seq))
    programs = num_kv_heads * ((batch + 7) // 8)
    steps = (max_pages_per_seq + pages - 1) // pages
    num_splits = 1 if programs >= 8 else max(1, min(4, steps))
    return RaggedBlocks(8, pages, num_splits)


def flash_blocks(q_len: int, kv_len: int, group: int, head_dim: int) -> FlashBlocks:
    q_tokens = max(8, _round_up(max(1, 256 // group), 8))
    q_tokens = min(q_tokens, _round_up(q_len, 8))
    kv = min(512 if head_dim <= 128 else 256, _round_up(kv_len, 128))
    return FlashBlocks(q_tokens, kv)
