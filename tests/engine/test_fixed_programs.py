"""Engine v2's fixed program set: every program compiles before ``LLM()`` returns, and serving lowers none.

Lowerings are counted with jax's own monitoring events (tests/lowerings.py), not the engine's bookkeeping. One
engine at default settings (the bundled model, float32 so CPU runs it at full speed) serves every test here.
"""

from __future__ import annotations

import random

import pytest

from jserve import BUNDLED_MODEL, LLM, SamplingParams, StructuredOutputsParams
from tests.lowerings import count_lowerings

DEFAULT_PROGRAMS = 12  # token buckets 1, 2, 4, ..., 2048 (max_num_batched_tokens), one pipeline stage
# structured outputs' deferred sampling: one small program per count of sampled rows, 1, 2, 4, ..., 64 (max_num_seqs)
DEFAULT_SAMPLING_PROGRAMS = 7


@pytest.fixture(scope="module")
def built():
    with count_lowerings() as lowered:
        llm = LLM(BUNDLED_MODEL, dtype="float32", min_token_bucket=1)  # CPU's default (conftest sets 8 for the rest)
    return llm, lowered


def test_program_count_at_default_settings(built):
    llm, lowered = built
    steps = [name for name in lowered if "_stage_step" in name]
    samplers = [name for name in lowered if "_sample_step" in name]
    # each program is either lowered and compiled, or loaded from the executable cache (an earlier build)
    loaded = llm.engine.runner.executables.loaded
    assert len(steps) + len(samplers) + loaded == DEFAULT_PROGRAMS + DEFAULT_SAMPLING_PROGRAMS
    assert len(steps) <= DEFAULT_PROGRAMS <= 16 and len(samplers) <= DEFAULT_SAMPLING_PROGRAMS
    assert llm.stats()["num_programs"] == DEFAULT_PROGRAMS + DEFAULT_SAMPLING_PROGRAMS


def _random_params(rng: random.Random, max_logprobs: int) -> SamplingParams:
    kind = rng.choice(["greedy", "temperature", "top_p", "top_k_min_p", "penalties", "everything"])
    options: dict = dict(max_tokens=rng.randint(1, 10), seed=rng.choice([None, rng.randint(0, 2**40)]))
    if kind != "greedy":
        options["temperature"] = rng.uniform(0.3, 1.5)
    if kind in ("top_p", "everything"):
        options["top_p"] = rng.uniform(0.3, 0.95)
    if kind in ("top_k_min_p", "everything"):
        options.update(top_k=rng.randint(1, 50), min_p=rng.uniform(0.0, 0.2))
    if kind in ("penalties", "everything"):
        options.update(
            repetition_penalty=rng.uniform(0.8, 1.5),
            presence_penalty=rng.uniform(-1, 1),
            frequency_penalty=rng.uniform(-1, 1),
        )
    if rng.random() < 0.3:
        options["logprobs"] = rng.randint(0, max_logprobs)
    if rng.random() < 0.15:
        options["prompt_logprobs"] = rng.randint(0, max_logprobs)
    if rng.random() < 0.2:
        options["n"] = rng.randint(2, 3)
    if rng.random() < 0.2:
        options["stop"] = [rng.choice(["\n", "(", " = ", "def"])]
    if rng.random() < 0.2:
        options["min_tokens"] = min(options["max_tokens"], rng.randint(1, 4))
        options["stop_token_ids"] = [rng.randint(0, 4000)]
    if rng.random() < 0.25:  # structured outputs: the grammar's bitmask is a runtime array, never a program
        options["structured_outputs"] = rng.choice(_STRUCTURED)
    return SamplingParams(**options)


_STRUCTURED = [
    StructuredOutputsParams(regex=r"[a-z]{2,6}(_[a-z0-9]{1,4})?"),
    StructuredOutputsParams(choice=["alpha", "beta", "gamma"]),
    StructuredOutputsParams(json={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
]


def _random_prompt(rng: random.Random, vocab: int, max_len: int) -> list[int]:
    length = rng.choice([1, 2, rng.randint(3, 40), rng.randint(40, 300), rng.randint(300, max_len - 16)])
    return [rng.randrange(1, vocab) for _ in range(length)]


def test_randomized_workload_lowers_nothing(built):
    llm, _ = built
    engine = llm.engine
    rng = random.Random(1234)
    limit = engine.limits.max_logprobs
    max_len = engine.max_model_len
    assert max_len == 2048
    long_prompt = [rng.randrange(1, engine.vocab_size) for _ in range(max_len - 12)]
    with count_lowerings() as lowered:
        # one batch holding every option at once, long prompts included
        prompts = [_random_prompt(rng, engine.vocab_size, max_len) for _ in range(20)] + [long_prompt]
        params = [_random_params(rng, limit) for _ in prompts]
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        assert all(o.finished for o in outputs)
        # streaming arrivals one at a time, with aborts of running and of queued requests
        live: list[str] = []
        for i in range(40):
            ids = _random_prompt(rng, engine.vocab_size, max_len)
            live.append(engine.add_request(ids, _random_params(rng, limit), request_id=f"arrival-{i}"))
            if rng.random() < 0.25:
                engine.abort_request(live.pop(rng.randrange(len(live))))
            for _ in range(rng.randint(0, 2)):
                engine.step()
        while engine.has_unfinished():
            engine.step()
        # text prompts through the tokenizer, stop strings, chat
        llm.generate(["def main(", "import "], SamplingParams(max_tokens=8, stop=["\n"]), use_tqdm=False)
    assert lowered == []
    stats = llm.stats()
    assert stats["programs_lowered_while_serving"] == 0
    assert stats["pages_free"] == stats["pages_total"]  # nothing leaked


def test_over_the_limit_is_refused_not_compiled(built):
    llm, _ = built
    with count_lowerings() as lowered:
        with pytest.raises(ValueError, match="logprobs"):
            llm.generate("x", SamplingParams(logprobs=llm.engine.limits.max_logprobs + 1), use_tqdm=False)
    assert lowered == []


def test_quantized_engine_keeps_the_program_set_and_lowers_nothing():
    """Weight and KV quantization are engine settings, not per-request flags: the same one program per bucket."""
    with count_lowerings() as built_lowered:
        llm = LLM(
            BUNDLED_MODEL,
            dtype="float32",
            quantization="int4",
            kv_cache_dtype="int8",
            max_model_len=256,
            max_num_batched_tokens=64,
            max_num_seqs=8,
            progress=False,
        )
    assert sorted(llm.engine.runner.stages[0].programs) == [8, 16, 32, 64]
    built = [name for name in built_lowered if "_stage_step" in name or "_sample_step" in name]
    assert len(built) + llm.engine.runner.executables.loaded == llm.stats()["num_programs"]  # the rest: loaded
    rng = random.Random(7)
    prompts = [[rng.randrange(1, llm.engine.vocab_size) for _ in range(rng.randint(1, 200))] for _ in range(12)]
    params = [_random_params(rng, llm.engine.limits.max_logprobs) for _ in prompts]
    with count_lowerings() as lowered:
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert all(o.finished for o in outputs)
    assert lowered == [] and llm.stats()["programs_lowered_while_serving"] == 0


def test_each_engine_counts_only_its_own_lowerings():
    """``programs_lowered_while_serving`` charges a lowering to the engine whose step made it: two engines that
    compile on first use, in one process and one thread, each count their own programs and none of the
    other's (it used to count every lowering in the process since ready)."""
    small = dict(dtype="float32", max_model_len=64, max_num_batched_tokens=8, max_num_seqs=2, precompile=False)
    first, second = LLM(BUNDLED_MODEL, **small), LLM(BUNDLED_MODEL, **small, seed=1)
    for llm in (first, second):  # compile on first use, not load what an earlier run put in the executable cache
        llm.engine.runner.executables = None
    params = SamplingParams(max_tokens=2, temperature=0.0)
    first.generate("def f(x):", params, use_tqdm=False)
    lowered_by_first = first.stats()["programs_lowered_while_serving"]
    assert lowered_by_first > 0 and second.stats()["programs_lowered_while_serving"] == 0
    second.generate("import os", params, use_tqdm=False)
    assert second.stats()["programs_lowered_while_serving"] > 0
    assert first.stats()["programs_lowered_while_serving"] == lowered_by_first
