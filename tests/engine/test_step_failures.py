"""Step-failure isolation: a step that raises (while building, dispatching or collecting it) fails only the
request that makes it fail; every other request completes with the tokens of a clean run, nothing leaks, and
the engine keeps serving. The fault is injected through ``Engine.fault_injector`` for one prompt."""

from __future__ import annotations

import asyncio

import pytest

from jserve import LLM, SamplingParams, memory_maps
from tests.engine.workloads import assert_no_leak, random_prompts
from tests.lowerings import count_lowerings

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
COMMON = dict(dtype="float32", max_model_len=160, page_size=8, max_num_seqs=32, precompile=False)


class Fault(RuntimeError):
    pass


def _inject(llm: LLM, phase: str, bad_prompt: list[int]) -> list[int]:
    """Makes every step of ``phase`` that holds the prompt raise; returns a list counting the raises."""
    raised = []
    engine = llm.engine

    def hook(where: str, seq_ids: list[str]) -> None:
        if where == phase and any(engine._sequences[s].prompt_token_ids == bad_prompt for s in seq_ids):
            raised.append(len(seq_ids))
            raise Fault(f"injected at {where}")

    engine.fault_injector = hook
    return raised


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=tiny_model_dir, num_pages=256, max_num_batched_tokens=512, **COMMON)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(32, 4, 60, seed=11)


@pytest.fixture(scope="module")
def clean(llm, prompts):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("phase", ["dispatch", "collect"])
def test_one_failing_request_among_32_fails_alone(llm, prompts, clean, phase):
    bad = 13
    raised = _inject(llm, phase, prompts[bad])
    failures_before = llm.stats()["num_step_failures"]
    try:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    finally:
        llm.engine.fault_injector = None
    assert raised[0] > 1 and raised[-1] == 1  # failed in a mixed step first, then alone
    assert outs[bad].outputs[0].finish_reason == "error"
    assert "injected at" in outs[bad].error
    for i, out in enumerate(outs):
        if i != bad:
            assert out.error is None and out.outputs[0].finish_reason == "length"
            assert out.outputs[0].token_ids == clean[i], i
    assert llm.stats()["num_step_failures"] - failures_before == len(raised)
    assert_no_leak(llm)
    llm.engine.kv_cache.check_invariants()
    again = llm.generate(prompt_token_ids=prompts[:4], sampling_params=GREEDY, use_tqdm=False)  # still serving
    assert [o.outputs[0].token_ids for o in again] == clean[:4]


def test_host_failure_of_one_request_ends_it_alone(llm, prompts, clean):
    """A request whose own host work on its new tokens raises (detokenizing, stop strings, grammar: here the
    whole of ``Engine._on_tokens``) is refused at once; the others are untouched."""
    engine = llm.engine
    original = engine._on_tokens

    def failing(request, *args):
        if request.prompt_token_ids == prompts[3]:
            raise Fault("host work failed")
        return original(request, *args)

    engine._on_tokens = failing
    try:
        outs = llm.generate(prompt_token_ids=prompts[:8], sampling_params=GREEDY, use_tqdm=False)
    finally:
        del engine._on_tokens
    assert outs[3].outputs[0].finish_reason == "error" and "host work failed" in outs[3].error
    assert [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 3] == [
        c for i, c in enumerate(clean[:8]) if i != 3
    ]
    assert_no_leak(llm)


def test_a_request_failing_only_in_company_is_refused_after_max_failures(llm, prompts, clean):
    """A fault that never fires alone (it needs another request in the step) cannot loop forever: each request
    it touches is refused once it was in MAX_STEP_FAILURES failed steps, or passes."""
    engine = llm.engine

    def hook(where: str, seq_ids: list[str]) -> None:
        if (
            where == "dispatch"
            and len(seq_ids) > 1
            and any(engine._sequences[s].prompt_token_ids == prompts[0] for s in seq_ids)
        ):
            raise Fault("only in company")

    engine.fault_injector = hook
    try:
        outs = llm.generate(prompt_token_ids=prompts[:6], sampling_params=GREEDY, use_tqdm=False)
    finally:
        engine.fault_injector = None
    assert all(o.finished for o in outs)
    assert outs[0].outputs[0].finish_reason == "error"
    assert_no_leak(llm)


def test_async_llm_raises_for_the_refused_request_only(llm, prompts, clean):
    """What the servers see: the refused request's consumer gets RequestFailedError (HTTP 500 / gRPC INTERNAL),
    the others their tokens, and the engine is not marked dead (health stays SERVING)."""
    from jserve.engine.async_llm import AsyncLLM, RequestFailedError

    _inject(llm, "collect", prompts[2])
    async_llm = AsyncLLM(llm.engine)

    async def run(prompt):
        tokens = []
        async for out in async_llm.generate(prompt, GREEDY):
            tokens += out.outputs[0].token_ids
        return tokens

    async def main():
        return await asyncio.gather(*(run(p) for p in prompts[:6]), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        async_llm.shutdown()
        llm.engine.fault_injector = None
    assert isinstance(results[2], RequestFailedError) and "injected at collect" in str(results[2])
    assert [r for i, r in enumerate(results) if i != 2] == [c for i, c in enumerate(clean[:6]) if i != 2]
    assert async_llm.errored is None
    assert_no_leak(llm)


def test_reallocating_the_pages_after_a_device_failure_lowers_nothing(llm, prompts, clean):
    """Recovery from a failed device step reallocates the KV pages with the allocators built at startup."""
    with count_lowerings() as lowered:
        llm.engine.runner.reset_kv_cache()
    assert lowered == []
    assert llm.engine.reset_prefix_cache()  # the zeroed pages hold no cached prefix any more
    again = llm.generate(prompt_token_ids=prompts[:4], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == clean[:4]


def test_no_room_for_a_program_fails_its_requests_with_the_reason_not_the_process(
    tiny_model_dir, prompts, clean, monkeypatch
):
    """A program that compiles on first use, in a process near ``vm.max_map_count`` (where XLA:CPU would crash
    it), fails the requests that needed it, saying why; once there is room, the same requests complete."""
    fresh = LLM(model=tiny_model_dir, num_pages=256, max_num_batched_tokens=512, **COMMON)  # nothing built yet
    used = memory_maps.maps_in_use()
    monkeypatch.setattr(memory_maps, "map_limit", lambda: used + memory_maps.MARGIN)
    outs = fresh.generate(prompt_token_ids=prompts[:2], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error", "error"]
    assert all("vm.max_map_count" in o.error for o in outs)
    assert_no_leak(fresh)
    monkeypatch.undo()
    again = fresh.generate(prompt_token_ids=prompts[:2], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == clean[:2]
