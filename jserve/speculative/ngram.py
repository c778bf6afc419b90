"""Prompt-lookup ("n-gram") speculation: draft tokens proposed by looking the sequence's own tail up in itself.

Prompt lookup needs no draft model: the last ``n`` tokens of the sequence (prompt + output so far) are searched
for earlier in the same sequence, and the tokens that followed that earlier occurrence are proposed as the next
``k`` drafts, which the target model then verifies in one forward pass. It pays off where output copies its
input: code editing, summarization and extraction, retrieval-augmented answers, repetitive text.

The longest n-gram (``max_n`` down to ``min_n``) that occurs earlier wins; among its occurrences the most recent
(rightmost) one is used. vLLM's ``NgramProposer`` takes the first (leftmost) match instead; we take the rightmost
because in editing and repetition workloads the latest context is the most predictive of what comes next. The
trade-off: a recent match leaves fewer tokens after it, so its drafts may be shorter than ``k``.

Host side, numpy only (no jax): the search is vectorized over positions, with a Python loop only over ``n``
(which stops at the first ``n`` that no longer occurs, so a sequence without repeats costs one comparison).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int32)


def _check_args(k: int, min_n: int, max_n: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min_n < 1:
        raise ValueError(f"min_n must be >= 1, got {min_n}")
    if max_n < min_n:
        raise ValueError(f"max_n must be >= min_n ({min_n}), got {max_n}")


def propose_ngram(tokens: np.ndarray | Sequence[int], *, k: int, min_n: int, max_n: int) -> np.ndarray:
    """Propose up to ``k`` draft tokens by prompt lookup.

    For each ``n`` in ``[min_n, max_n]``, the last ``n`` tokens (the suffix) are searched for at every earlier start
    ``i`` with ``i + n <= len(tokens) - 1`` (so at least one token follows the occurrence, and the suffix never
    matches itself; an occurrence may overlap the suffix). The longest ``n`` with any occurrence wins, and of its
    occurrences the rightmost (most recent) is used: the proposal is ``tokens[i + n : i + n + k]``, fewer than ``k``
    tokens where the sequence ends sooner. (vLLM's ``NgramProposer`` uses the leftmost occurrence; the most recent
    context is the better predictor in editing and repetition workloads.)

    Args:
        tokens: the sequence so far (prompt + generated output), 1-D integers.
        k: the most draft tokens to propose, >= 1.
        min_n: the shortest suffix to look up, >= 1.
        max_n: the longest suffix to look up, >= ``min_n``.

    Returns:
        The drafts, int32, length 0 (no occurrence, or a sequence shorter than ``min_n + 1``) to ``k``.

    Raises:
        ValueError: ``k``, ``min_n`` or ``max_n`` out of range, or ``tokens`` not 1-D integers.
    """
    _check_args(k, min_n, max_n)
    seq = np.asarray(tokens)
    if seq.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {seq.shape}")
    length = seq.shape[0]
    if length < min_n + 1:
        return _EMPTY.copy()
    if not np.issubdtype(seq.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {seq.dtype}")
    # hits[e]: the n-gram ending at e (with e <= length - 2, so a token follows it) equals the suffix. Grown one n
    # at a time; an n-gram occurs only where its (n - 1)-suffix does, so no hits for n means none for any larger n.
    hits = seq[:-1] == seq[-1]
    found = -1  # the end of the rightmost occurrence of the longest n-gram found, n >= min_n
    for n in range(1, min(max_n, length - 1) + 1):
        if n > 1:
            hits[n - 1 :] &= seq[: length - n] == seq[length - n]  # seq[e - n + 1] == seq[length - n]
            hits[n - 2] = False  # the n-gram ending there would start before the sequence
        if not hits.any():
            break
        if n >= min_n:
            found = length - 2 - int(np.argmax(hits[::-1]))
    if found < 0:
        return _EMPTY.copy()
    return seq[found + 1 : found + 1 + k].astype(np.int32)


def propose_ngram_batch(
    sequences: Sequence[np.ndarray | Sequence[int]],
    *,
    k: int,
    min_n: int,
    max_n: int,
    limits: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """:func:`propose_ngram` for each sequence, the ``i``-th result capped at ``limits[i]`` drafts when given.

    A limit (e.g. the room left before ``max_tokens`` or the model length) may be 0, which gives an empty proposal.

    Raises:
        ValueError: as :func:`propose_ngram`, or ``limits`` of another length than ``sequences`` or negative.
    """
    _check_args(k, min_n, max_n)
    if limits is None:
        return [propose_ngram(seq, k=k, min_n=min_n, max_n=max_n) for seq in sequences]
    if len(limits) != len(sequences):
        raise ValueError(f"limits must have one entry per sequence ({len(sequences)}), got {len(limits)}")
    out: list[np.ndarray] = []
    for seq, limit in zip(sequences, limits, strict=True):
        if limit < 0:
            raise ValueError(f"limits must be >= 0, got {limit}")
        cap = min(k, int(limit))
        out.append(propose_ngram(seq, k=cap, min_n=min_n, max_n=max_n) if cap else _EMPTY.copy())
    return out
