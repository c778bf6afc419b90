"""Chained verification (speculation under async scheduling, jserve/speculative/chain.py).

A request's next verification is dispatched while its current one is still on the device; the device moves
the row back by the drafts the current one rejected, and looks its drafts up itself (n-gram) or runs the
drafter's k steps at the moved-back positions (early exit, draft model). The same engine stepping
synchronously (every verification laid out exactly on the host) is the reference: the tokens, logprobs and
acceptance must be the same, with and without seeds, at any max_tokens, with stop tokens, whatever else shares
the steps.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jserve import SamplingParams
from jserve.speculative.ngram import propose_ngram
from jserve.speculative.ngram_device import append_emitted, propose_on_device
from tests.engine.workloads import assert_no_leak
from tests.speculative.test_speculative import METHODS, _prompts, _speculative_engine


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    k=st.integers(1, 6),
    min_n=st.integers(1, 3),
    extra_n=st.integers(0, 2),
    limit=st.integers(0, 8),
)
def test_device_lookup_is_the_host_lookup(tokens, k, min_n, extra_n, limit):
    """``propose_on_device`` proposes what ``propose_ngram`` does (capped at the row's limit)."""
    width = 48
    history = np.zeros((2, width), np.int32)
    history[1, : len(tokens)] = tokens
    drafts, counts = propose_on_device(
        jnp.asarray(history),
        jnp.array([0, len(tokens)]),
        jnp.array([limit, limit]),
        k=k,
        min_n=min_n,
        max_n=min_n + extra_n,
    )
    cap = min(k, limit)
    want = propose_ngram(tokens, k=cap, min_n=min_n, max_n=min_n + extra_n) if cap else []
    assert np.asarray(drafts[1, : int(counts[1])]).tolist() == list(want)
    assert int(counts[0]) == 0  # an empty history has nothing to look up
    assert not np.asarray(drafts[1, int(counts[1]) :]).any()


def test_appending_emitted_tokens():
    history = np.zeros((2, 6), np.int32)
    history[0, :2] = [7, 8]
    out, lengths = append_emitted(
        jnp.asarray(history), jnp.array([2, 5]), jnp.array([[1, 2, 3], [4, 5, 6]]), jnp.array([2, 3])
    )
    assert np.asarray(out).tolist() == [[7, 8, 1, 2, 0, 0], [0, 0, 0, 0, 0, 4]]
    assert np.asarray(lengths).tolist() == [4, 6]  # (writes past the width are dropped)


@pytest.fixture(scope="module", params=list(METHODS))
def speculating(request):
    _, llm, _ = _speculative_engine(request.param)
    return llm


def _run(llm, prompts, params, *, chained: bool):
    """Outputs of one generate call with async scheduling (chained verification) on or off, and how many
    dispatched steps held a chained row."""
    engine = llm.engine
    while engine.has_unfinished():  # (a lookahead step may still be on the device)
        engine.step()
    engine.async_scheduling = chained
    dispatch = engine.runner.dispatch
    counted = []

    def counting(plans, previous=None, **kwargs):
        spec = plans[0].inputs.spec
        counted.append(spec is not None and spec.chain is not None and bool((spec.chain.src >= 0).any()))
        return dispatch(plans, previous, **kwargs)

    engine.runner.dispatch = counting
    try:
        before = llm.stats()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        after = llm.stats()
    finally:
        engine.runner.dispatch = dispatch
        engine.async_scheduling = True
    drafted = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
    accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
    return outputs, sum(counted), (drafted, accepted)


def _params(i: int) -> SamplingParams:
    options: dict = dict(max_tokens=5 + (i * 11) % 40, logprobs=1)
    if i % 3 == 1:
        options.update(temperature=0.8, seed=100 + i)  # sampling steps must move back with the row
    else:
        options.update(temperature=0.0)
    if i % 4 == 2:
        options["stop_token_ids"] = [4019]  # a token the bundled model emits while repeating code
    if i % 5 == 3:
        options["presence_penalty"] = 0.5  # not chained (its history would need the tokens on the host)
    return SamplingParams(**options)


def _assert_same(got, expected) -> None:
    for a, b in zip(got, expected, strict=True):
        x, y = a.outputs[0], b.outputs[0]
        assert x.token_ids == y.token_ids, (a.request_id, x.token_ids, y.token_ids)
        assert x.finish_reason == y.finish_reason and x.stop_reason == y.stop_reason
        for lx, ly in zip(x.logprobs, y.logprobs, strict=True):
            assert lx.keys() == ly.keys() and max(abs(lx[t] - ly[t]) for t in lx) < 1e-5


def test_chained_verification_gives_the_synchronous_engines_outputs(speculating):
    """One request at a time: the same tokens, logprobs, drafts and accepted drafts as the engine stepping
    synchronously (greedy and seeded sampling, max_tokens inside a verified run, stop tokens), most
    verifications chained, nothing lowered, nothing leaked."""
    prompts = _prompts(8)
    params = [_params(i) for i in range(8)]
    chained_steps = 0
    for prompt, p in zip(prompts, params, strict=True):
        got, chained, counters = _run(speculating, [prompt], [p], chained=True)
        expected, none, expected_counters = _run(speculating, [prompt], [p], chained=False)
        _assert_same(got, expected)
        assert counters == expected_counters
        chained_steps += chained
        assert none == 0
    assert chained_steps > 16
    assert speculating.stats()["programs_lowered_while_serving"] == 0
    assert_no_leak(speculating)
    speculating.engine.kv_cache.check_invariants()


def test_chained_rows_share_steps_with_other_requests(speculating):
    """Eight requests at once (prefill chunks, penalised requests that verify synchronously, stop tokens): the
    greedy ones give the synchronous engine's tokens and logprobs. (Seeded ones may draft at other steps here,
    as a step with a long prefill chunk leaves chained rows out, so their text may differ: documented.)"""
    prompts = _prompts(8)
    params = [_params(i) for i in range(8)]
    got, chained, _ = _run(speculating, prompts, params, chained=True)
    expected, _, _ = _run(speculating, prompts, params, chained=False)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    _assert_same([got[i] for i in greedy], [expected[i] for i in greedy])
    assert chained > 4
    assert speculating.stats()["programs_lowered_while_serving"] == 0
    assert_no_leak(speculating)
    speculating.engine.kv_cache.check_invariants()
