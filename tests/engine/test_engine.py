"""The engine end to end on a tiny model: continuous batching, preemption, chunked prefill, prefix caching,
seeded sampling, stops, n > 1, logprobs, streaming, aborts and page accounting."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jserve import LLM, SamplingParams
from tests.engine.workloads import assert_no_leak, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
COMMON = dict(dtype="float32", max_model_len=160, page_size=8, max_num_seqs=16, precompile=False)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=tiny_model_dir, num_pages=256, max_num_batched_tokens=128, **COMMON)


@pytest.fixture(scope="module")
def prompts64():
    return random_prompts(64, 4, 100)


@pytest.fixture(scope="module")
def one_at_a_time(llm, prompts64):
    return [_tokens(llm.generate(prompt_token_ids=[p], sampling_params=GREEDY, use_tqdm=False))[0] for p in prompts64]


def test_batched_equals_one_at_a_time(llm, prompts64, one_at_a_time):
    outs = llm.generate(prompt_token_ids=prompts64, sampling_params=GREEDY, use_tqdm=False)
    assert _tokens(outs) == one_at_a_time
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_no_leak(llm)


def test_preemption_gives_the_same_tokens(tiny_model_dir, prompts64, one_at_a_time):
    small = LLM(model=tiny_model_dir, num_pages=40, max_num_batched_tokens=128, **COMMON)
    outs = small.generate(prompt_token_ids=prompts64, sampling_params=GREEDY, use_tqdm=False)
    assert small.stats()["num_preemptions"] > 0
    assert _tokens(outs) == one_at_a_time
    assert_no_leak(small)


def test_chunked_prefill_gives_the_same_tokens(tiny_model_dir, prompts64, one_at_a_time):
    chunked = LLM(model=tiny_model_dir, num_pages=256, max_num_batched_tokens=32, **COMMON)
    assert max(len(p) for p in prompts64) > 32
    outs = chunked.generate(prompt_token_ids=prompts64, sampling_params=GREEDY, use_tqdm=False)
    assert _tokens(outs) == one_at_a_time
    assert_no_leak(chunked)


def test_prefix_caching_same_outputs_fewer_prompt_tokens(tiny_model_dir, llm):
    prefix = random_prompts(1, 64, 64, seed=7)[0]
    prompts = [prefix + s for s in random_prompts(8, 3, 9, seed=8)]
    no_cache = LLM(
        model=tiny_model_dir, num_pages=256, max_num_batched_tokens=128, enable_prefix_caching=False, **COMMON
    )
    before = llm.stats()["prompt_tokens_computed"]
    cached_out = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    computed_cached = llm.stats()["prompt_tokens_computed"] - before
    plain_out = no_cache.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert _tokens(cached_out) == _tokens(plain_out)
    total = sum(len(p) for p in prompts)
    assert no_cache.stats()["prompt_tokens_computed"] == total
    # the shared 64-token prefix (8 full pages) is computed once, not 8 times
    assert computed_cached <= total - 7 * 64
    assert llm.stats()["prefix_cache_hit_rate"] > 0
    assert cached_out[1].metrics.num_cached_tokens == 64
    assert_no_leak(llm)


def test_seeded_sampling_is_batch_independent(llm):
    target = random_prompts(1, 20, 20, seed=3)[0]
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=1234, ignore_eos=True)
    alone = _tokens(llm.generate(prompt_token_ids=[target], sampling_params=params, use_tqdm=False))[0]
    others = random_prompts(15, 5, 60, seed=4)
    mixed = [SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True) for _ in others]
    outs = llm.generate(
        prompt_token_ids=others[:7] + [target] + others[7:],
        sampling_params=mixed[:7] + [params] + mixed[7:],
        use_tqdm=False,
    )
    assert outs[7].outputs[0].token_ids == alone
    different = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=99, ignore_eos=True)
    assert _tokens(llm.generate(prompt_token_ids=[target], sampling_params=different, use_tqdm=False))[0] != alone


def test_stop_strings_are_excluded_and_found_across_tokens(llm):
    prompt = "The quick brown fox"
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    text = base[0].outputs[0].text
    assert len(text) > 12, text
    stop = text[5:9]
    first = text.find(stop)
    out = llm.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.text == text[:first]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    streamed = list(
        llm.generate_stream(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))
    )
    assert "".join(d.outputs[0].text for d in streamed) == text[:first]
    assert streamed[-1].finished and streamed[-1].outputs[0].finish_reason == "stop"
    assert_no_leak(llm)


def test_stop_token_ids_and_min_tokens(llm):
    prompt = [[11, 22, 33, 44, 55]]
    first = _tokens(llm.generate(prompt_token_ids=prompt, sampling_params=GREEDY, use_tqdm=False))[0][0]
    stopped = llm.generate(
        prompt_token_ids=prompt,
        use_tqdm=False,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first]),
    )[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first
    held = llm.generate(
        prompt_token_ids=prompt,
        use_tqdm=False,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first], min_tokens=3),
    )[0].outputs[0]
    assert len(held.token_ids) >= 3 and held.token_ids[0] != first


def test_n_samples_logprobs_and_streaming(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5, logprobs=3, ignore_eos=True)
    out = llm.generate("Hello there", params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.token_ids) == len(c.logprobs) == 6
        for token, entry in zip(c.token_ids, c.logprobs, strict=True):
            assert token in entry and len(entry) >= 3 and all(v <= 0 for v in entry.values())
    greedy = llm.generate(
        "Hello there",
        SamplingParams(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    for token, entry in zip(greedy.token_ids, greedy.logprobs, strict=True):
        assert entry[token] == pytest.approx(max(entry.values()))
    deltas = list(llm.generate_stream("Hello there", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)))
    assert "".join(d.outputs[0].text for d in deltas) == greedy.text
    assert sum((d.outputs[0].token_ids for d in deltas), []) == greedy.token_ids
    assert_no_leak(llm)


def test_final_only_requests_report_once_with_everything(llm):
    """stream=False (what LLM.generate uses): no deltas until the request ends, then one output equal to the
    merged stream of the same request, n > 1 samples and stop strings included; an abort still reports."""
    engine = llm.engine
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=7, stop=["e"], ignore_eos=True)
    streamed = list(llm.generate_stream("Hello there", params))
    engine.add_request(streamed[0].prompt_token_ids, params, request_id="final", stream=False)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), request_id="cut", stream=False)
    reports = []
    aborted = False
    while engine.has_unfinished():
        outs = engine.step()
        reports += outs
        if engine.num_steps >= 3 and not aborted:
            engine.abort_request("cut")
            aborted = True
    assert [o.request_id for o in reports] == ["final", "cut"] or [o.request_id for o in reports] == ["cut", "final"]
    assert all(o.finished for o in reports)
    final = next(o for o in reports if o.request_id == "final")
    for index in (0, 1):
        pieces = [c for d in streamed for c in d.outputs if c.index == index]
        (whole,) = [c for c in final.outputs if c.index == index]
        assert whole.text == "".join(c.text for c in pieces)
        assert whole.token_ids == sum((c.token_ids for c in pieces), [])
        assert whole.finish_reason == pieces[-1].finish_reason
    (cut,) = next(o for o in reports if o.request_id == "cut").outputs
    assert cut.finish_reason == "abort"
    assert_no_leak(llm)


def test_abandoned_stream_frees_pages(llm):
    stream = llm.generate_stream([5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert_no_leak(llm)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_arrivals_and_aborts_leave_no_pages(llm, data):
    engine = llm.engine
    plan = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, 6),
                st.integers(1, 70),
                st.integers(1, 10),
                st.one_of(st.none(), st.integers(0, 8)),
            ),
            min_size=1,
            max_size=12,
        )
    )
    finished: dict[str, int] = {}
    added: list[str] = []
    for step in range(60):
        for i, (arrive, length, max_tokens, abort_at) in enumerate(plan):
            if arrive == step:
                rid = f"h{i}"
                engine.add_request(
                    list(range(3, 3 + length)), SamplingParams(max_tokens=max_tokens, seed=i), request_id=rid
                )
                added.append(rid)
            if abort_at is not None and arrive + abort_at == step:
                engine.abort_request(f"h{i}")
        for delta in engine.step():
            if delta.finished:
                finished[delta.request_id] = finished.get(delta.request_id, 0) + 1
        if step > 8 and not engine.has_unfinished():
            break
    assert sorted(finished) == sorted(added)
    assert all(count == 1 for count in finished.values())
    stats = llm.stats()
    assert stats["pages_free"] == stats["pages_total"]
    assert stats["pages_cached"] <= stats["pages_free"]  # cached pages are all evictable
