"""Prompt-lookup (n-gram) proposer: exact proposals on hand-made sequences, the batch helper's limits, argument
validation, and agreement with a loop-over-positions reference on random sequences."""

from __future__ import annotations

import numpy as np
import pytest

from jserve.speculative.ngram import propose_ngram, propose_ngram_batch


def reference_ngram(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition, spelled out: longest n first, rightmost earlier occurrence followed by a token."""
    length = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if length < n + 1:
            continue
        suffix = tokens[length - n :]
        for i in range(length - n - 1, -1, -1):  # i + n <= length - 1, right to left
            if tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


def propose(tokens, k=3, min_n=1, max_n=3) -> list[int]:
    out = propose_ngram(tokens, k=k, min_n=min_n, max_n=max_n)
    assert out.dtype == np.int32 and out.ndim == 1 and len(out) <= k
    return out.tolist()


def test_proposes_what_followed_the_match():
    assert propose([5, 6, 7, 8, 9, 6, 7], k=2, min_n=2, max_n=2) == [8, 9]


def test_longest_ngram_preferred():
    # the 1-gram [3] last occurs at 4 (followed by 20); the 2-gram [2, 3] only at 1 (followed by 10)
    seq = [1, 2, 3, 10, 3, 20, 2, 3]
    assert propose(seq, k=1, min_n=1, max_n=2) == [10]
    assert propose(seq, k=1, min_n=1, max_n=1) == [20]


def test_longer_max_n_without_match_falls_back():
    seq = [1, 2, 3, 10, 3, 20, 2, 3]  # no earlier [20, 2, 3] or [3, 20, 2, 3]
    assert propose(seq, k=2, min_n=2, max_n=4) == [10, 3]


def test_rightmost_match_chosen():
    seq = [1, 2, 10, 11, 1, 2, 20, 21, 1, 2, 30, 31, 40, 1, 2]
    assert propose(seq, k=3, min_n=2, max_n=2) == [30, 31, 40]


def test_fewer_than_k_at_end_of_sequence():
    # the match at 2 is followed by only [7, 1] before the suffix
    assert propose([9, 9, 1, 7, 1], k=5, min_n=1, max_n=1) == [7, 1]
    # an occurrence overlapping the suffix: [1, 1] last occurs at 2, leaving one token after it
    assert propose([1, 1, 1, 1], k=4, min_n=2, max_n=2) == [1]


def test_no_match_is_empty():
    out = propose_ngram([1, 2, 3, 4, 5], k=3, min_n=1, max_n=3)
    assert out.dtype == np.int32 and out.shape == (0,)


def test_suffix_does_not_match_itself():
    assert propose([4, 5, 6], k=3, min_n=1, max_n=3) == []
    assert propose([4], k=3, min_n=1, max_n=1) == []
    # the whole sequence as the suffix of itself: nothing precedes it
    assert propose([4, 4], k=3, min_n=2, max_n=2) == []


def test_min_n_respected():
    seq = [1, 2, 3, 4, 2]  # the only repetition is the 1-gram [2]
    assert propose(seq, k=2, min_n=1, max_n=3) == [3, 4]
    assert propose(seq, k=2, min_n=2, max_n=3) == []


def test_short_sequences_are_empty():
    assert propose([], k=2, min_n=1, max_n=2) == []
    assert propose(np.zeros(0, dtype=np.int64), k=2, min_n=1, max_n=2) == []
    assert propose([7, 7], k=2, min_n=2, max_n=3) == []  # shorter than min_n + 1


def test_max_n_longer_than_sequence():
    assert propose([3, 8, 3], k=2, min_n=1, max_n=10) == [8, 3]


def test_accepts_arrays_of_any_int_dtype_and_copies():
    for dtype in (np.int32, np.int64, np.uint16):
        seq = np.array([5, 6, 7, 5, 6], dtype=dtype)
        out = propose_ngram(seq, k=2, min_n=1, max_n=2)
        assert out.dtype == np.int32 and out.tolist() == [7, 5]
        out[0] = 99
        assert seq.tolist() == [5, 6, 7, 5, 6]


def test_large_token_ids():
    big = 150_000  # beyond int16, within int32 vocabularies
    assert propose([big, big + 1, big + 2, big], k=2, min_n=1, max_n=1) == [big + 1, big + 2]


def test_batch_without_limits():
    seqs = [[1, 2, 3, 1], [4, 5, 6], np.array([7, 8, 7])]
    out = propose_ngram_batch(seqs, k=2, min_n=1, max_n=2)
    assert [o.tolist() for o in out] == [[2, 3], [], [8, 7]]
    assert all(o.dtype == np.int32 for o in out)


def test_batch_limits():
    seq = [1, 2, 3, 4, 5, 1]
    out = propose_ngram_batch([seq, seq, seq, seq], k=3, min_n=1, max_n=1, limits=[0, 1, 2, 10])
    assert [o.tolist() for o in out] == [[], [2], [2, 3], [2, 3, 4]]
    assert all(o.dtype == np.int32 for o in out)


def test_batch_empty():
    assert propose_ngram_batch([], k=3, min_n=1, max_n=2) == []
    assert propose_ngram_batch([], k=3, min_n=1, max_n=2, limits=[]) == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"k": 0, "min_n": 1, "max_n": 2}, "k"),
        ({"k": -1, "min_n": 1, "max_n": 2}, "k"),
        ({"k": 2, "min_n": 0, "max_n": 2}, "min_n"),
        ({"k": 2, "min_n": 3, "max_n": 2}, "max_n"),
    ],
)
def test_argument_validation(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        propose_ngram([1, 2, 1], **kwargs)
    with pytest.raises(ValueError, match=rf"^{name} "):
        propose_ngram_batch([[1, 2, 1]], **kwargs)
    with pytest.raises(ValueError, match=rf"^{name} "):
        propose_ngram([], **kwargs)  # checked even when the sequence is too short to match


def test_tokens_validation():
    with pytest.raises(ValueError, match="tokens"):
        propose_ngram(np.zeros((2, 3), dtype=np.int32), k=2, min_n=1, max_n=2)
    with pytest.raises(ValueError, match="tokens"):
        propose_ngram([1.0, 2.0, 1.0], k=2, min_n=1, max_n=2)


def test_batch_limits_validation():
    with pytest.raises(ValueError, match="limits"):
        propose_ngram_batch([[1, 2, 1], [3]], k=2, min_n=1, max_n=2, limits=[1])
    with pytest.raises(ValueError, match="limits"):
        propose_ngram_batch([[1, 2, 1]], k=2, min_n=1, max_n=2, limits=[-1])


def test_matches_reference_on_random_sequences():
    rng = np.random.default_rng(1234)
    nonempty = 0
    for trial in range(200):
        length = int(rng.integers(0, 60))
        alphabet = int(rng.integers(2, 6))
        seq = rng.integers(0, alphabet, size=length).tolist()
        min_n = int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 4))
        k = int(rng.integers(1, 8))
        expected = reference_ngram(seq, k, min_n, max_n)
        got = propose_ngram(np.array(seq, dtype=np.int64), k=k, min_n=min_n, max_n=max_n)
        assert got.dtype == np.int32
        assert got.tolist() == expected, (trial, seq, k, min_n, max_n)
        assert propose_ngram(seq, k=k, min_n=min_n, max_n=max_n).tolist() == expected
        nonempty += bool(expected)
    assert 50 < nonempty < 200  # the sample exercises both outcomes
