"""Verification on the device (jserve.speculative.verify), directly: greedy acceptance and rejection sampling's law.

Synthetic target distributions p_0, p_1, p_2 and draft distributions q_0, q_1 over 6 tokens, 20,000 rows with
their own seeds, drafts sampled from q on the host. Speculative sampling must emit a first token distributed as
p_0 and, when a draft was accepted, a second one distributed as p_1 (here p does not depend on the context).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jserve.engine.sampler import RowSpec, make_sampling_tensors
from jserve.sampling_params import SamplingParams
from jserve.speculative.verify import expand_rows, verify

P = np.array(
    [
        [0.40, 0.30, 0.10, 0.10, 0.05, 0.05],
        [0.05, 0.45, 0.20, 0.10, 0.10, 0.10],
        [0.10, 0.10, 0.10, 0.10, 0.30, 0.30],
    ]
)
Q = np.array([[0.05, 0.05, 0.10, 0.10, 0.30, 0.40], [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
ROWS = 20_000
TV_BOUND = 0.02  # measured: ~0.005 for the correct rule; the over-accepting variant below: ~0.2


def _tv(samples: np.ndarray, p: np.ndarray) -> float:
    empirical = np.bincount(samples, minlength=len(p)) / len(samples)
    return 0.5 * float(np.abs(empirical - p).sum())


def _verify(q_seen_by_verifier: np.ndarray | None, *, temperature: float = 1.0, one_hot: bool = False):
    rng = np.random.default_rng(0)
    k, vocab = Q.shape
    drafts = np.stack([rng.choice(vocab, size=ROWS, p=Q[i]) for i in range(k)], axis=1).astype(np.int32)
    rows = [
        RowSpec(SamplingParams(temperature=temperature), seed=i, step=0, prompt_token_ids=[1], output_token_ids=[])
        for i in range(ROWS)
    ]
    tensors = make_sampling_tensors(rows, history_len=0, banned_len=0)
    num_drafts = np.full(ROWS, k, np.int32)
    expanded = expand_rows(tensors, drafts, num_drafts, np.zeros(ROWS, np.int32))
    logits = np.tile(np.log(P), (ROWS, 1)).astype(np.float32)
    probs = None if one_hot else np.broadcast_to(q_seen_by_verifier, (ROWS, k, vocab)).astype(np.float32)
    out = jax.jit(verify, static_argnums=5)(logits, expanded, drafts, num_drafts, probs, 0)
    return drafts, np.asarray(out.token_ids), np.asarray(out.num_emitted)


def test_rejection_sampling_emits_the_target_distribution():
    _, tokens, emitted = _verify(Q)
    assert _tv(tokens[:, 0], P[0]) < TV_BOUND
    second = emitted >= 2
    assert second.sum() > 1000
    assert _tv(tokens[second, 1], P[1]) < TV_BOUND


def test_accepting_too_often_is_caught_by_the_bound():
    """The negative control: a verifier that believes q is half what it is accepts min(1, 2p/q) of the drafts,
    and its first tokens drift toward q by far more than the bound."""
    _, tokens, _ = _verify(Q / 2)
    assert _tv(tokens[:, 0], P[0]) > 5 * TV_BOUND


def test_one_hot_drafts_keep_the_target_distribution():
    """n-gram drafts: q is a point mass, accepted with probability p(d); a rejection draws from p without d."""
    _, tokens, _ = _verify(None, one_hot=True)
    assert _tv(tokens[:, 0], P[0]) < TV_BOUND


@pytest.mark.parametrize("one_hot", [False, True])
def test_greedy_accepts_exactly_the_argmax_prefix(one_hot):
    drafts, tokens, emitted = _verify(None if one_hot else Q, temperature=0.0, one_hot=one_hot)
    argmax = P.argmax(axis=1)
    first_ok = drafts[:, 0] == argmax[0]
    both_ok = first_ok & (drafts[:, 1] == argmax[1])
    expected = np.where(both_ok, 3, np.where(first_ok, 2, 1))
    np.testing.assert_array_equal(emitted, expected)
    np.testing.assert_array_equal(tokens[:, 0], argmax[0])
    np.testing.assert_array_equal(tokens[first_ok, 1], argmax[1])
    np.testing.assert_array_equal(tokens[both_ok, 2], argmax[2])
