"""One constrained sequence's grammar state, and the bitmask rows the sampler reads.

A bitmask row holds ceil(V / 32) int32 words; bit ``t % 32`` of word ``t // 32`` set means token t is allowed.
Unconstrained rows are all ones (-1), which the sampler recognises and skips.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import numpy as np


class GrammarState:
    """The llguidance matcher of one sequence: it has consumed exactly the sequence's output tokens so far.

    Preemption keeps it as it is (the outputs survive recompute); speculative drafts are consumed only while
    their masks are computed and rolled back at once, so verification's outcome is the only thing applied.
    """

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    @property
    def matcher(self) -> llguidance.LLMatcher:
        return self._matcher

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """The allowed next tokens into ``bitmask[row]`` (a C-contiguous int32 row)."""
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)

    def fill_with_drafts(self, bitmask: np.ndarray, first_row: int, drafts: Sequence[int]) -> None:
        """Rows first_row + j, j = 0..n: the mask after the first j drafts (verification positions), n being how
        many drafts the grammar accepts; the rows past n are never read, since verification rejects draft n
        (its mask excludes it). Drafts past n are never consumed (a rejected token would put the matcher in its
        error state for good), and the matcher ends where it started."""
        valid = self.valid_prefix(drafts)
        for j in range(valid + 1):
            self.fill(bitmask, first_row + j)
            if j < valid:
                self._matcher.consume_token(int(drafts[j]))
        if valid:
            self._matcher.rollback(valid)

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` the grammar accepts from here (drafts past them are dropped)."""
        return int(self._matcher.validate_tokens([int(t) for t in tokens])) if len(tokens) else 0

    def accept(self, tokens: Sequence[int]) -> bool:
        """Consumes sampled tokens; False if the grammar rejects one (then the state is in error)."""
        return all(self._matcher.consume_token(int(t)) for t in tokens)

    @property
    def is_terminated(self) -> bool:
        """No token but EOS can follow: the output is complete."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_EXECUTOR: llguidance.LLExecutor | None = None


def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool (one per process, made on first use)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


def fill_bitmask_rows(rows: Sequence[tuple[GrammarState, int, Sequence[int]]], bitmask: np.ndarray) -> None:
    """Fills each constrained row's masks: (state, first row, drafts) -> rows first row .. first row + drafts.
    Rows without drafts are filled together by llguidance's parallel executor (it computes the masks in its
    own threads, outside the GIL)."""
    plain = [(state, row) for state, row, drafts in rows if not drafts]
    for state, row, drafts in rows:
        if drafts:
            state.fill_with_drafts(bitmask, row, drafts)
    if len(plain) == 1:
        state, row = plain[0]
        state.fill(bitmask, row)
    elif plain:
        if not (bitmask.flags.c_contiguous and bitmask.dtype == np.int32):
            raise ValueError("bitmask must be a C-contiguous int32 array")
        matchers = [(state.matcher, row) for state, row in plain]
        _executor().unsafe_compute_mask_ptr(matchers, bitmask.ctypes.data, bitmask[0].nbytes, bitmask.shape[0])
