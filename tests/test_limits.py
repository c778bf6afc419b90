"""Admission limits through LLM: every client-controlled size is bounded, refused at once, naming the field
and the limit, and the engine keeps serving with no page leaked."""

from __future__ import annotations

import time

import pytest

from jserve import LLM, SamplingParams
from jserve.engine.factory import EngineArgs
from jserve.limits import RequestLimits, RequestTooLargeError, pages_needed

MAX_NUM_SEQS = 4
NUM_PAGES = 25  # 24 usable pages of 16 tokens
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(
        tiny_model_dir,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=MAX_NUM_SEQS,
        num_pages=NUM_PAGES,
        max_num_batched_tokens=64,
        precompile=False,
    )


OVERSIZE = [
    (dict(n=MAX_NUM_SEQS + 1), r"^n: got 5; at most 4 allowed \(max_n\)"),
    (dict(n=100_000_000), r"^n: got 100000000; at most 4 allowed \(max_n\)"),
    (dict(logprobs=21), r"^logprobs: got 21; at most 20 allowed \(max_logprobs\)"),
    (dict(prompt_logprobs=10**9), r"^prompt_logprobs: got 1000000000; at most 20 allowed \(max_logprobs\)"),
    (dict(stop=[f"s{i}" for i in range(17)]), r"^stop: got 17 strings; at most 16 allowed \(max_stop_strings\)"),
    (dict(stop=["x" * 257]), r"^stop: a stop string has 257 characters; at most 256"),
    (dict(stop_token_ids=list(range(65))), r"^stop_token_ids: got 65 ids; at most 64 allowed \(max_stop_token_ids\)"),
    (dict(stop_token_ids=[1] * 10**6), r"^stop_token_ids: got 1000000 ids"),
]


@pytest.mark.parametrize(("kwargs", "message"), OVERSIZE, ids=[m.split(":")[0][1:] for _, m in OVERSIZE])
def test_oversize_sampling_fields_are_refused_at_once(llm, kwargs, message):
    start = time.monotonic()
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt_token_ids=[[1, 5, 6]], sampling_params=SamplingParams(**kwargs), use_tqdm=False)
    assert time.monotonic() - start < 1.0
    assert llm.stats()["num_waiting"] == 0 and llm.stats()["num_running"] == 0


def test_oversize_prompts_are_refused_before_any_work(llm):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^prompt is too long: 1000000 tokens, max_model_len is 128"):
        llm.generate(prompt_token_ids=[[5] * 1_000_000], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt: 10000000 characters cannot fit in max_model_len 128 tokens"):
        llm.generate(["a" * 10_000_000], use_tqdm=False)
    assert time.monotonic() - start < 1.0


def test_request_whose_samples_never_fit_the_pool_is_refused_not_queued(llm):
    # 4 samples x 100 tokens (7 pages each, the 6-token prompt shares no full page) = 28 pages > 24
    params = SamplingParams(n=4, max_tokens=94, ignore_eos=True)
    with pytest.raises(RequestTooLargeError, match=r"^n: 4 samples of up to 100 tokens need 28 KV pages at once"):
        llm.generate(prompt_token_ids=[[1, 2, 3, 4, 5, 6]], sampling_params=params, use_tqdm=False)
    assert llm.stats()["num_waiting"] == 0
    # the same request with room to fit runs to the end
    (out,) = llm.generate(
        prompt_token_ids=[[1, 2, 3, 4, 5, 6]],
        sampling_params=SamplingParams(n=4, max_tokens=40, ignore_eos=True),
        use_tqdm=False,
    )
    assert [len(c.token_ids) for c in out.outputs] == [40] * 4


def test_engine_keeps_serving_after_refusals_and_leaks_no_pages(llm):
    for kwargs, _ in OVERSIZE:
        with pytest.raises(ValueError):
            llm.generate(prompt_token_ids=[[1, 5]], sampling_params=SamplingParams(**kwargs), use_tqdm=False)
    params = SamplingParams(n=MAX_NUM_SEQS, max_tokens=4, logprobs=20, stop=["s"] * 16, stop_token_ids=[3] * 64)
    (out,) = llm.generate(prompt_token_ids=[[1, 5, 6, 7]], sampling_params=params, use_tqdm=False)
    assert len(out.outputs) == MAX_NUM_SEQS and out.finished
    stats = llm.stats()
    assert stats["pages_free"] == stats["pages_total"] and stats["num_running"] == 0


def test_limits_follow_engine_args(tiny_model_dir):
    limits = EngineArgs(model=str(tiny_model_dir), max_num_seqs=8, max_n=2, max_logprobs=5).limits
    assert (limits.max_n, limits.max_logprobs) == (2, 5)
    with pytest.raises(ValueError, match=r"^n: got 3; at most 2 allowed \(max_n\)"):
        limits.check_sampling(SamplingParams(n=3))
    with pytest.raises(ValueError, match=r"^logprobs: got 6; at most 5 allowed \(max_logprobs\)"):
        limits.check_sampling(SamplingParams(logprobs=6))
    assert EngineArgs(model="m", max_num_seqs=8).limits.max_n == 8
    with pytest.raises(ValueError, match=r"^max_n must be an integer in \[1, max_num_seqs=8\]"):
        EngineArgs(model="m", max_num_seqs=8, max_n=9)
    with pytest.raises(ValueError, match=r"^max_logprobs must be an integer >= 0"):
        EngineArgs(model="m", max_logprobs=-1)


def test_pages_needed_counts_shared_prompt_pages_once():
    params = SamplingParams(n=3, max_tokens=20)
    # 40-token prompt + 20 = 60 tokens = 4 pages of 16; 2 full prompt pages are shared by the 3 samples
    assert pages_needed(40, params, max_model_len=1000, page_size=16, shared=True) == 2 + 3 * 2
    assert pages_needed(40, params, max_model_len=1000, page_size=16, shared=False) == 3 * 4
    assert pages_needed(40, params, max_model_len=48, page_size=16, shared=False) == 3 * 3  # capped by the length


def test_limit_settings_are_validated():
    with pytest.raises(ValueError, match=r"^max_stop_strings must be an integer >= 1"):
        RequestLimits(max_n=1, max_stop_strings=0)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_refused(value):
    with pytest.raises(ValueError, match=r"^temperature must be a finite float32 number"):
        SamplingParams(temperature=value)


@pytest.mark.parametrize("value", [0, 3, 12, True, 2.0])
def test_min_token_bucket_must_be_a_power_of_two(value):
    with pytest.raises(ValueError, match=r"^min_token_bucket must be a power of two >= 1"):
        EngineArgs(model="m", min_token_bucket=value)


def test_token_buckets_start_at_the_platforms_minimum():
    from jserve.engine.factory import default_min_token_bucket
    from jserve.engine.shapes import StepShapes

    assert (default_min_token_bucket("cpu"), default_min_token_bucket("gpu"), default_min_token_bucket("tpu")) == (
        1,
        8,
        8,
    )
    shapes = StepShapes.from_limits(
        max_num_batched_tokens=64,
        max_num_seqs=8,
        max_model_len=64,
        page_size=8,
        banned_len=1,
        min_tokens=1,
        spec_rows=2,
        num_spec_tokens=3,
    )
    assert shapes.token_buckets == (1, 2, 4, 8, 16, 32, 64)
    assert shapes.spec_token_buckets == (2, 4, 8)  # a verification step holds a row and a draft at least
