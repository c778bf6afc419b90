"""Tests for jserve.engine.sampler: filters, penalties, seeds, distributions and logprobs against numpy.

Everything is seeded (numpy RNGs, PRNG seeds, derandomized hypothesis) so nothing can flake. Each jitted
function is compiled once per shape and reused (sampling options are runtime arrays), so shapes are kept to a
small set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jserve.engine.sampler import (
    RowSpec,
    SamplerOutput,
    SamplingTensors,
    _ordered_keys,
    _value_of,
    categorical,
    filtered_logits,
    greedy_ids,
    make_sampling_tensors,
    process_logits,
    sample,
    switches,
)
from jserve.sampling_params import SamplingParams
from tests.lowerings import count_lowerings

SAMPLE = jax.jit(sample, static_argnames="max_logprobs")
PROCESS = jax.jit(process_logits)
FILTERED = jax.jit(filtered_logits)

HYP = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def tensors(b: int, *, hist: int = 0, banned: int = 0, **overrides) -> SamplingTensors:
    """Neutral sampled rows (temperature 1, filters and penalties off); overrides are broadcast to [B]."""
    fields = dict(
        temperature=np.ones(b, np.float32),
        top_k=np.zeros(b, np.int32),
        top_p=np.ones(b, np.float32),
        min_p=np.zeros(b, np.float32),
        repetition_penalty=np.ones(b, np.float32),
        presence_penalty=np.zeros(b, np.float32),
        frequency_penalty=np.zeros(b, np.float32),
        seeds=np.arange(b, dtype=np.uint32),
        steps=np.zeros(b, np.int32),
        num_logprobs=np.zeros(b, np.int32),
        token_history=np.full((b, hist), -1, np.int32),
        history_is_output=np.zeros((b, hist), bool),
        banned_token_ids=np.full((b, banned), -1, np.int32),
        token_bitmask=np.full((b, 0), -1, np.int32),
    )
    for name, value in overrides.items():
        ref = fields[name]
        fields[name] = np.broadcast_to(np.asarray(value, dtype=ref.dtype), ref.shape).copy()
    return SamplingTensors(**fields)


def run(logits, t: SamplingTensors, max_logprobs: int = 0) -> SamplerOutput:
    return jax.device_get(SAMPLE(jnp.asarray(logits), t, max_logprobs=max_logprobs))


def np_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_top_p_set(scaled: np.ndarray, p: float) -> set[int]:
    """Smallest set of highest-prob tokens whose mass reaches p, in float64."""
    probs = np_softmax(scaled)
    order = np.argsort(-probs, kind="stable")
    exclusive = np.cumsum(probs[order]) - probs[order]
    return {int(i) for i in order[exclusive < p]}


# ----------------------------------------------------------------------------------------------------
# Greedy
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_greedy_equals_argmax(dtype):
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)) * 3, dtype)
    expected = np.argmax(np.asarray(logits.astype(jnp.float32)), axis=-1)
    out = run(logits, tensors(8, temperature=0.0))
    np.testing.assert_array_equal(out.token_ids, expected)
    assert out.token_ids.dtype == np.int32
    # Greedy rows with filters set stay greedy.
    out = run(logits, tensors(8, temperature=0.0, top_k=3, top_p=0.5))
    np.testing.assert_array_equal(out.token_ids, expected)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    rows=st.lists(
        st.lists(
            st.sampled_from([0.0, 1.0, -1.5, 2.0, float("inf"), float("-inf"), float("nan")]), min_size=1, max_size=9
        ),
        min_size=1,
        max_size=4,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_greedy_ids_are_argmax_with_ties_infinities_and_nan(rows):
    """The two-reduction argmax picks what jnp.argmax picks: the first maximum, the first NaN of a row with one,
    index 0 of an all -inf row (rows drawn from a few values, so ties are common)."""
    x = jnp.asarray(rows, jnp.float32)
    got = np.asarray(_GREEDY_IDS(x))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(x, axis=-1)))
    assert got.dtype == np.int32


_GREEDY_IDS = jax.jit(greedy_ids)


@pytest.mark.parametrize("top_k", [0, 5])
def test_temperature_zero_rows_are_greedy_in_mixed_batch(top_k):
    rng = np.random.default_rng(1)
    b = 64
    logits = rng.normal(size=(b, 64)).astype(np.float32)  # flat-ish: sampled rows rarely hit the argmax
    temperature = np.where(np.arange(b) % 2 == 0, 0.0, 1.5).astype(np.float32)
    t = tensors(b, temperature=temperature, top_k=np.where(np.arange(b) % 4 == 1, top_k, 0), top_p=0.9 if top_k else 1)
    tokens = run(logits, t).token_ids
    argmax = logits.argmax(-1)
    np.testing.assert_array_equal(tokens[::2], argmax[::2])
    assert (tokens[1::2] != argmax[1::2]).sum() > 5  # the sampled rows really sample


# ----------------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------------

V_HYP = 32
B_MANY = 128
logit_rows = st.lists(
    st.floats(-8.0, 8.0, allow_nan=False, allow_subnormal=False, width=32),
    min_size=V_HYP,
    max_size=V_HYP,
    unique=True,
).map(lambda v: np.asarray(v, np.float32))


@HYP
@given(row=logit_rows, k=st.integers(1, V_HYP), temp=st.floats(0.3, 3.0))
def test_top_k_never_leaves_top_k(row, k, temp):
    logits = np.broadcast_to(row, (B_MANY, V_HYP))
    t = tensors(B_MANY, temperature=temp, top_k=k, seeds=np.arange(B_MANY) * 7919)
    tokens = run(logits, t).token_ids
    kth = np.sort(row)[::-1][k - 1]
    allowed = set(np.flatnonzero(row >= kth).tolist())
    assert set(tokens.tolist()) <= allowed
    if k == 1:
        assert set(tokens.tolist()) == {int(row.argmax())}


@HYP
@given(row=logit_rows, p=st.floats(0.02, 0.999), temp=st.floats(0.3, 3.0))
def test_top_p_keeps_smallest_set_reaching_p(row, p, temp):
    scaled = row.astype(np.float64) / np.float32(temp)
    probs = np.sort(np_softmax(scaled))[::-1]
    assume(np.min(np.abs(np.cumsum(probs) - p)) > 1e-4)  # stay clear of f32 rounding at the boundary
    allowed = np_top_p_set(scaled, p)
    t = tensors(B_MANY, temperature=temp, top_p=p, seeds=np.arange(B_MANY) + 1000)
    logits = np.broadcast_to(row, (B_MANY, V_HYP))
    # The filter mask equals the numpy set exactly ...
    kept = np.isfinite(np.asarray(FILTERED(jnp.asarray(logits), t))[0])
    assert set(np.flatnonzero(kept).tolist()) == allowed
    # ... and every sample lies in it.
    assert set(run(logits, t).token_ids.tolist()) <= allowed


def test_top_p_small_set_all_members_appear():
    row = np.array([3.0, 2.8, 2.6, 0.0, -1.0, -2.0, -3.0, -4.0], np.float32)
    p = 0.8
    allowed = np_top_p_set(row, p)
    assert allowed == {0, 1, 2}  # masses ~0.36, 0.30, 0.24 -> exclusive 0.66 < 0.8 keeps token 2
    b = 600
    t = tensors(b, top_p=p, seeds=np.arange(b) * 31 + 5, steps=np.arange(b) % 3)
    tokens = run(np.broadcast_to(row, (b, 8)), t).token_ids
    assert set(tokens.tolist()) == allowed


@HYP
@given(row=logit_rows, k=st.integers(1, V_HYP), p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 1.0))
def test_combined_filter_mask_matches_numpy(row, k, p, min_p):
    """top-k -> top-p on the renormalised top-k distribution -> min-p (relative to the max prob)."""
    order = np.argsort(-row, kind="stable")
    top = order[:k]
    probs = np_softmax(row[top].astype(np.float64))
    cum = np.cumsum(probs)
    assume(p >= 1.0 or np.min(np.abs(cum - p)) > 1e-4)
    max_prob = probs.max()
    assume(np.min(np.abs(probs - min_p * max_prob)) > 1e-5)
    exclusive = cum - probs
    keep = (exclusive < p) | (p >= 1.0)
    keep &= probs >= min_p * max_prob
    keep[0] = True
    expected = {int(i) for i in top[keep]}

    t = tensors(1, top_k=k, top_p=p, min_p=min_p)
    kept = np.isfinite(np.asarray(FILTERED(jnp.asarray(row[None]), t))[0])
    assert set(np.flatnonzero(kept).tolist()) == expected


tied_rows = st.lists(st.integers(-8, 8).map(lambda i: i / 2) | st.just(float("-inf")), min_size=V_HYP, max_size=V_HYP)


def np_filter_keep(row: np.ndarray, k: int, p: float, min_p: float) -> np.ndarray:
    """The filters by a full sort, in float64: the threshold is the last value of the sorted prefix (top-k,
    then exclusive top-k mass below p); every token tied with it survives."""
    ordered = np.sort(row.astype(np.float64))[::-1]
    top = ordered[: k if 0 < k < len(row) else len(row)]
    probs = np.exp(top - top[0])
    probs /= probs.sum()
    keep = (np.cumsum(probs) - probs < p) | (p >= 1.0)
    keep[0] = True
    survives = row >= top[keep.sum() - 1]
    if min_p > 0:
        survives &= row >= row.max() + np.log(min_p)
    return survives & np.isfinite(row)


@HYP
@given(row=tied_rows, k=st.integers(0, V_HYP + 2), p=st.floats(0.05, 1.0), min_p=st.sampled_from([0.0, 0.05, 0.3]))
def test_filters_keep_ties_and_match_a_full_sort(row, k, p, min_p):
    """Many tied logits and -inf entries: the bisection's thresholds are the sorted reference's."""
    row = np.asarray(row, np.float32)
    assume(np.isfinite(row).any())
    ordered = np.sort(row[np.isfinite(row)].astype(np.float64))[::-1]
    probs = np.exp(ordered[: k if 0 < k < len(ordered) else len(ordered)] - ordered[0])
    assume(p >= 1.0 or np.min(np.abs(np.cumsum(probs / probs.sum()) - p)) > 1e-4)
    t = tensors(1, top_k=k, top_p=p, min_p=min_p)
    kept = np.isfinite(np.asarray(FILTERED(jnp.asarray(row[None]), t))[0])
    np.testing.assert_array_equal(kept, np_filter_keep(row, k, p, min_p))


def test_top_p_counts_only_k_of_the_values_tied_at_the_kth():
    """top-k 2 over [2, 1, 1, 1, 0, ...]: the renormalised top-2 mass is e^2 + e^1 (one of the three tied 1s),
    so the first 1 has exclusive mass e^2 / (e^2 + e) = 0.731; then every token tied with it survives."""
    row = np.array([[2.0, 1.0, 1.0, 1.0] + [0.0] * 4], np.float32)
    for p, expected in [(0.75, [0, 1, 2, 3]), (0.7, [0])]:
        kept = np.isfinite(np.asarray(FILTERED(jnp.asarray(row), tensors(1, top_k=2, top_p=p)))[0])
        assert np.flatnonzero(kept).tolist() == expected, p


def test_ordered_keys_sort_like_the_floats():
    """The bisection's integer keys order float32 values as the floats do (signed zeros, infinities and
    subnormals included) and map back to the same values."""
    rng = np.random.default_rng(11)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0], np.float32)
    values = np.concatenate([special, (rng.normal(size=500) * 10.0 ** rng.integers(-30, 30, 500)).astype(np.float32)])
    keys = np.asarray(jax.jit(_ordered_keys)(jnp.asarray(values)))
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(values[order].astype(np.float64)) >= 0)
    np.testing.assert_array_equal(np.asarray(jax.jit(_value_of)(jnp.asarray(keys))), values + np.float32(0.0))


def test_categorical_draws_only_finite_entries():
    """Inverse-CDF draws: never a -inf entry, the lone finite entry always, token 0 for a row with none, and
    every finite entry of a flat row of a large vocabulary reachable."""
    b, v = 4000, 40
    logits = np.full((b, v), -np.inf, np.float32)
    logits[:, [3, 17, 39]] = [0.0, 1.0, -1.0]
    logits[0] = -np.inf
    logits[1] = -np.inf
    logits[1, 25] = 2.0
    keys = jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32))
    drawn = np.asarray(jax.jit(categorical)(keys, jnp.asarray(logits)))
    assert drawn[0] == 0 and drawn[1] == 25
    counts = np.bincount(drawn[2:], minlength=v)
    assert set(np.flatnonzero(counts)) == {3, 17, 39}
    assert chi2(counts[[3, 17, 39]], np_softmax(np.array([0.0, 1.0, -1.0]))) < CHI2_CRIT[2]
    flat = jnp.zeros((b, 32000), jnp.float32)
    assert len(np.unique(np.asarray(jax.jit(categorical)(keys, flat)))) > 3500


def test_top_p_applies_to_renormalised_top_k():
    probs = np.array([0.3, 0.2, 0.1] + [0.4 / 13] * 13)
    logits = np.log(probs).astype(np.float32)[None]
    # Full distribution: exclusive masses 0, 0.3, 0.5 -> top-p 0.45 would keep {0, 1}; after top-3 the
    # masses are 0.5, 0.33, 0.17, so top-p 0.45 keeps {0} only.
    t = tensors(1, top_k=3, top_p=0.45)
    kept = np.isfinite(np.asarray(FILTERED(jnp.asarray(logits), t))[0])
    assert np.flatnonzero(kept).tolist() == [0]
    t = tensors(1, top_k=0, top_p=0.45)
    kept = np.isfinite(np.asarray(FILTERED(jnp.asarray(logits), t))[0])
    assert np.flatnonzero(kept).tolist() == [0, 1]


def test_min_p_never_samples_below_threshold():
    rng = np.random.default_rng(2)
    b = 512
    row = rng.normal(size=V_HYP).astype(np.float32) * 2
    for min_p, temp in [(0.1, 1.0), (0.3, 2.0), (0.05, 0.7)]:
        t = tensors(b, min_p=min_p, temperature=temp, seeds=np.arange(b) + int(min_p * 1000))
        tokens = run(np.broadcast_to(row, (b, V_HYP)), t).token_ids
        probs = np_softmax(row.astype(np.float64) / temp)
        allowed = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
        assert set(tokens.tolist()) <= allowed
        assert len(set(tokens.tolist())) >= min(3, len(allowed))


def test_filters_never_produce_nan_or_empty_rows():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, V_HYP)).astype(np.float32)
    logits[1, :] = -np.inf  # fully masked by the model
    logits[2, 5:] = -np.inf
    t = tensors(4, top_k=[1, 3, 40, 0], top_p=[1e-6, 0.5, 1.0, 1e-6], min_p=[1.0, 0.0, 0.9, 1.0], temperature=0.01)
    x = np.asarray(FILTERED(jnp.asarray(logits), t))
    assert not np.isnan(x).any()
    for r in (0, 2, 3):
        assert np.isfinite(x[r]).sum() >= 1
        assert np.isfinite(x[r, logits[r].argmax()])
    out = run(logits, t)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[3] == logits[3].argmax()
    assert 0 <= out.token_ids[1] < V_HYP and out.token_ids[2] < 5


# ----------------------------------------------------------------------------------------------------
# Penalties and banned ids
# ----------------------------------------------------------------------------------------------------


def np_process(logits, rep, pres, freq, history, is_output, banned):
    out = np.asarray(logits, np.float64).copy()
    b, v = out.shape
    for r in range(b):
        for tok in banned[r]:
            if 0 <= tok < v:
                out[r, tok] = -np.inf
        hist = history[r][history[r] >= 0]
        outs = history[r][(history[r] >= 0) & is_output[r]]
        for tok in set(hist.tolist()):
            out[r, tok] = out[r, tok] / rep[r] if out[r, tok] > 0 else out[r, tok] * rep[r]
        counts = np.bincount(outs, minlength=v)
        out[r] -= freq[r] * counts
        out[r] -= pres[r] * (counts > 0)
    return out


def test_penalties_match_numpy():
    rng = np.random.default_rng(4)
    b, v, h, nb = 6, 48, 40, 3
    logits = (rng.normal(size=(b, v)) * 4).astype(np.float32)
    history = rng.integers(0, 12, size=(b, h)).astype(np.int32)  # small id range: many repeats
    lengths = rng.integers(0, h + 1, size=b)
    lengths[0] = h
    lengths[1] = 0
    for r in range(b):
        history[r, lengths[r] :] = -1
    prompt_len = rng.integers(0, h, size=b)
    is_output = (np.arange(h)[None, :] >= prompt_len[:, None]) & (history >= 0)
    banned = np.full((b, nb), -1, np.int32)
    banned[2, :2] = [3, 47]
    banned[3, 0] = 0
    rep = np.array([1.3, 0.7, 1.0, 2.0, 1.1, 1.0], np.float32)
    pres = np.array([0.5, -0.5, 1.0, 0.0, 2.0, 0.0], np.float32)
    freq = np.array([0.25, 0.0, -1.0, 0.3, -2.0, 0.0], np.float32)
    t = tensors(
        b,
        hist=h,
        banned=nb,
        repetition_penalty=rep,
        presence_penalty=pres,
        frequency_penalty=freq,
        token_history=history,
        history_is_output=is_output,
        banned_token_ids=banned,
    )
    got = np.asarray(PROCESS(jnp.asarray(logits), t))
    expected = np_process(logits, rep, pres, freq, history, is_output, banned)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Padding (-1) never touches token V-1; the last row is fully neutral.
    assert got[0, v - 1] == pytest.approx(logits[0, v - 1])
    np.testing.assert_array_equal(got[5], logits[5])
    # With neutral penalties (the device skips the stage), bans still apply.
    zero = np.zeros(b, np.float32)
    neutral = dataclasses.replace(
        t, repetition_penalty=np.ones(b, np.float32), presence_penalty=zero, frequency_penalty=zero
    )
    got = np.asarray(PROCESS(jnp.asarray(logits), neutral))
    np.testing.assert_allclose(got, np_process(logits, np.ones(b), zero, zero, history, is_output, banned))


def test_repetition_penalty_direction():
    logits = np.array([[2.0, -2.0, 1.0, -1.0]], np.float32)
    t = tensors(1, hist=2, repetition_penalty=2.0, token_history=[[0, 1]], history_is_output=[[False, False]])
    got = np.asarray(PROCESS(jnp.asarray(logits), t))
    np.testing.assert_allclose(got, [[1.0, -4.0, 1.0, -1.0]])  # prompt tokens penalised too


@pytest.mark.parametrize("mode", ["greedy", "plain", "filters"])
def test_banned_ids_never_sampled(mode):
    rng = np.random.default_rng(5)
    b, v = 256, 16
    logits = rng.normal(size=(b, v)).astype(np.float32)
    logits[:, 7] = 10.0  # the banned id dominates
    logits[:, 3] = 9.0
    banned = np.tile(np.array([7, 3, -1, -1], np.int32), (b, 1))
    temperature = 0.0 if mode == "greedy" else 2.0
    t = tensors(b, banned=4, banned_token_ids=banned, temperature=temperature, top_k=v if mode == "filters" else 0)
    tokens = run(logits, t).token_ids
    assert not np.isin(tokens, [3, 7]).any()
    if mode == "greedy":
        masked = logits.copy()
        masked[:, [3, 7]] = -np.inf
        np.testing.assert_array_equal(tokens, masked.argmax(-1))
    else:
        assert (tokens == v - 1).any()  # -1 padding does not ban the last id


# ----------------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------------


def test_seed_determinism_independent_of_batch():
    rng = np.random.default_rng(6)
    n, v = 24, 64
    logits = rng.normal(size=(n, v)).astype(np.float32)
    seeds = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    steps = rng.integers(0, 1000, size=n).astype(np.int32)

    def batch(idx, pad_to):
        """Rows idx (in that order), then filler rows with other settings up to pad_to."""
        k = pad_to - len(idx)
        lg = np.concatenate([logits[idx], rng.normal(size=(k, v)).astype(np.float32)])
        t = tensors(
            pad_to,
            seeds=np.concatenate([seeds[idx], rng.integers(0, 2**31, size=k).astype(np.uint32)]),
            steps=np.concatenate([steps[idx], rng.integers(0, 50, size=k).astype(np.int32)]),
            temperature=np.concatenate([np.ones(len(idx)), rng.uniform(0, 2, size=k)]),
            top_k=np.concatenate([np.zeros(len(idx)), rng.integers(0, 5, size=k)]),
        )
        return lg, t

    lg, t = batch(np.arange(n), n)
    reference = run(lg, t).token_ids
    assert len(set(reference.tolist())) > n // 3
    perm = rng.permutation(n)
    for idx, pad_to in [(perm, 32), (perm[:5], 8), (perm[::-1], 48)]:
        lg, t = batch(idx, pad_to)
        np.testing.assert_array_equal(run(lg, t).token_ids[: len(idx)], reference[idx])
    for i in (0, 7):  # a row alone
        lg, t = batch(np.array([i]), 1)
        assert run(lg, t).token_ids[0] == reference[i]


def test_steps_and_seeds_give_different_streams():
    b, v = 256, 64
    logits = np.zeros((b, v), np.float32)
    same_seed = run(logits, tensors(b, seeds=42, steps=np.arange(b))).token_ids
    assert len(set(same_seed.tolist())) > 40  # ~63 expected for independent uniform draws
    same_step = run(logits, tensors(b, seeds=np.arange(b) + 1, steps=3)).token_ids
    assert len(set(same_step.tolist())) > 40
    assert (same_seed != same_step).sum() > b // 2
    again = run(logits, tensors(b, seeds=42, steps=np.arange(b))).token_ids
    np.testing.assert_array_equal(same_seed, again)


# ----------------------------------------------------------------------------------------------------
# Distribution
# ----------------------------------------------------------------------------------------------------

CHI2_CRIT = {7: 29.9, 3: 21.1, 2: 18.4}  # chi-square critical values at p = 1e-4 by degrees of freedom


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_distribution_matches_softmax():
    row = np.array([1.5, 0.5, 0.0, -0.3, -1.0, 0.8, -2.0, 0.2], np.float32)
    temps = [0.5, 1.0, 2.0]
    n = 8000
    b = n * len(temps)
    t = tensors(b, temperature=np.repeat(temps, n), seeds=12345, steps=np.arange(b))
    tokens = run(np.broadcast_to(row, (b, 8)), t).token_ids
    for j, temp in enumerate(temps):
        counts = np.bincount(tokens[j * n : (j + 1) * n], minlength=8)
        assert chi2(counts, np_softmax(row / temp)) < CHI2_CRIT[7], (temp, counts)
    # With top-k 4 the draws follow the renormalised top-4 distribution.
    t = tensors(n, top_k=4, temperature=1.3, seeds=np.arange(n) + 99)
    tokens = run(np.broadcast_to(row, (n, 8)), t).token_ids
    top4 = np.argsort(-row)[:4]
    counts = np.bincount(tokens, minlength=8)
    assert counts.sum() == counts[top4].sum()
    assert chi2(counts[top4], np_softmax(row[top4] / 1.3)) < CHI2_CRIT[3], counts


# ----------------------------------------------------------------------------------------------------
# Logprobs
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logprobs_are_raw_log_softmax(dtype):
    rng = np.random.default_rng(7)
    b, v, k = 8, 64, 5
    logits = jnp.asarray(rng.normal(size=(b, v)) * 3, dtype)
    raw = np.asarray(logits.astype(jnp.float32))
    t = tensors(
        b,
        hist=4,
        temperature=np.where(np.arange(b) % 2, 0.7, 0.0),
        top_k=10,
        repetition_penalty=1.5,
        frequency_penalty=0.5,
        token_history=np.tile([1, 2, 3, -1], (b, 1)),
        history_is_output=np.tile([False, True, True, False], (b, 1)),
        num_logprobs=np.where(np.arange(b) == 3, k, 1),
    )
    out = run(logits, t, k)
    expected = np_log_softmax(raw)
    np.testing.assert_allclose(out.logprobs, expected[np.arange(b), out.token_ids], rtol=1e-5, atol=1e-5)
    assert out.top_ids.shape == (b, k) and out.top_logprobs.shape == (b, k)
    assert out.top_ids.dtype == np.int32 and out.top_logprobs.dtype == np.float32
    assert (np.diff(out.top_logprobs, axis=-1) <= 0).all()
    np.testing.assert_array_equal(out.top_ids, np.argsort(-raw, axis=-1, kind="stable")[:, :k])
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(expected, out.top_ids, -1), rtol=1e-5, atol=1e-5)
    out = run(logits, dataclasses.replace(t, num_logprobs=np.zeros(b, np.int32)), k)
    assert out.top_ids.shape == (b, k) and not out.top_ids.any() and not out.top_logprobs.any()  # not computed


# ----------------------------------------------------------------------------------------------------
# make_sampling_tensors
# ----------------------------------------------------------------------------------------------------


def row(step=0, seed=0, prompt=(1, 2), output=(), banned=(), **params) -> RowSpec:
    return RowSpec(SamplingParams(**params), seed, step, list(prompt), list(output), list(banned))


def on(t: SamplingTensors) -> dict[str, bool]:
    return {name: bool(value) for name, value in dataclasses.asdict(switches(t)).items()}


def test_make_sampling_tensors_fields_padding_and_switches():
    rows = [
        row(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=2**32 + 5, step=3, logprobs=2),
        row(temperature=0.0, top_k=3, prompt=(4, 5, 6), output=(7,), banned=(0, 9)),
        row(temperature=1.0, frequency_penalty=0.5, prompt=(1, 1), output=(2, 3, 3), logprobs=4),
    ]
    t = make_sampling_tensors(rows, pad_to=5)
    assert on(t) == dict(any_sampled=True, use_penalties=True, use_filters=True, any_logprobs=True)
    np.testing.assert_array_equal(t.num_logprobs, [2, 0, 4, 0, 0])
    np.testing.assert_allclose(t.temperature, [0.7, 0.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(t.top_k, [5, 3, 0, 0, 0])
    np.testing.assert_allclose(t.top_p, [0.9, 1, 1, 1, 1])
    np.testing.assert_allclose(t.min_p, [0.1, 0, 0, 0, 0])
    np.testing.assert_allclose(t.frequency_penalty, [0, 0, 0.5, 0, 0])
    np.testing.assert_allclose(t.repetition_penalty, [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(t.steps, [3, 0, 0, 0, 0])
    assert t.seeds.dtype == np.uint32 and t.seeds[0] == 4 and t.seeds[2] == 0
    # History: only the penalised row, prompt then output, width = its length.
    assert t.token_history.shape == (5, 5) and t.token_history.dtype == np.int32
    np.testing.assert_array_equal(t.token_history[2], [1, 1, 2, 3, 3])
    np.testing.assert_array_equal(t.history_is_output[2], [False, False, True, True, True])
    assert (t.token_history[[0, 1, 3, 4]] == -1).all() and not t.history_is_output[[0, 1, 3, 4]].any()
    np.testing.assert_array_equal(t.banned_token_ids, [[-1, -1], [0, 9], [-1, -1], [-1, -1], [-1, -1]])
    assert t.temperature.dtype == np.float32 and t.top_k.dtype == np.int32 and t.steps.dtype == np.int32

    # Bucketed widths; too-small widths raise.
    t = make_sampling_tensors(rows, history_len=16, banned_len=4)
    assert t.token_history.shape == (3, 16) and t.banned_token_ids.shape == (3, 4)
    for kwargs in (dict(history_len=4), dict(banned_len=1), dict(pad_to=2)):
        with pytest.raises(ValueError):
            make_sampling_tensors(rows, **kwargs)

    # It feeds the sampler directly; padded rows are greedy.
    t = make_sampling_tensors(rows, pad_to=8, history_len=8, banned_len=2)
    logits = np.random.default_rng(8).normal(size=(8, V_HYP)).astype(np.float32)
    out = run(logits, t, 4)
    np.testing.assert_array_equal(out.token_ids[3:], logits[3:].argmax(-1))
    assert out.token_ids[1] not in (0, 9)
    assert out.top_ids.shape == (8, 4)


def test_switch_cases():
    t = make_sampling_tensors([row(temperature=0.0), row(temperature=0.0, top_p=0.5)], pad_to=4)
    assert on(t) == dict(any_sampled=False, use_penalties=False, use_filters=False, any_logprobs=False)
    t = make_sampling_tensors([row(temperature=0.0, repetition_penalty=1.2)])
    assert on(t) == dict(any_sampled=False, use_penalties=True, use_filters=False, any_logprobs=False)
    t = make_sampling_tensors([row(temperature=1.0, presence_penalty=0.0, logprobs=0)])
    assert on(t) == dict(any_sampled=True, use_penalties=False, use_filters=False, any_logprobs=False)
    assert t.token_history.shape == (1, 0) and t.banned_token_ids.shape == (1, 0)
    t = make_sampling_tensors([], pad_to=2)
    assert not any(on(t).values()) and t.temperature.shape == (2,)
    t = make_sampling_tensors([row(temperature=0.5, min_p=0.2)], history_len=6)
    assert on(t)["use_filters"] and not on(t)["use_penalties"] and t.token_history.shape == (1, 6)


def test_one_program_for_every_option_mix():
    """Greedy, sampled, filtered, penalised, banned and logprob rows, alone and mixed: one compiled program."""
    rng = np.random.default_rng(9)
    b, v, k = 8, V_HYP, 3
    logits = jnp.asarray(rng.normal(size=(b, v)).astype(np.float32))
    variants = [
        [row(temperature=0.0)] * b,
        [row(temperature=0.9, top_k=4)] * b,
        [row(temperature=0.0, repetition_penalty=1.3, output=(1, 2))] * b,
        [row(temperature=1.0, min_p=0.1, logprobs=3, banned=(5,))] * b,
        [row(temperature=0.0), row(temperature=1.0, top_p=0.5, presence_penalty=0.4, logprobs=1)] * (b // 2),
    ]
    lowered = []
    for rows in variants:
        t = make_sampling_tensors(rows, history_len=8, banned_len=2)
        with count_lowerings() as programs:
            out = run(logits, t, k)
        lowered.append(len(programs))
        assert out.top_ids.shape == (b, k)
        greedy = t.temperature == 0
        expected = np.asarray(PROCESS(logits, t)).argmax(-1)
        np.testing.assert_array_equal(out.token_ids[greedy], expected[greedy])
    assert lowered[1:] == [0] * (len(variants) - 1)
