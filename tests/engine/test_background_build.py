"""precompile="background": ready once the first programs exist; steps use only built programs (none waits on a
compile, none compiles), with the tokens of an engine that built everything first; the rest arrive in the
background and are used once built."""

from __future__ import annotations

import time

import pytest

from jserve import BUNDLED_MODEL, LLM, SamplingParams
from jserve.engine.runner import ModelRunner

SETTINGS = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64, max_num_seqs=4, progress=False)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _prompts(llm: LLM) -> list[list[int]]:
    """Prompts of 3 to 150 tokens: decodes, short prefills and ones chunked over several steps."""
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 6
    ids = llm.engine.tokenizer.encode(text)
    return [ids[:n] for n in (3, 17, 40, 150)]


@pytest.fixture(scope="module")
def everything_first():
    return LLM(BUNDLED_MODEL, **SETTINGS)


def test_only_the_first_programs_serve_until_the_rest_are_built(monkeypatch, everything_first):
    started = []
    monkeypatch.setattr(ModelRunner, "build_in_background", lambda self: started.append(self))
    llm = LLM(BUNDLED_MODEL, **SETTINGS, precompile="background")
    (runner,) = started
    assert runner.first_buckets() == [8, 64]  # the smallest bucket and the largest (no bucket holds 256 tokens)
    assert runner.ready_shapes.token_buckets == (8, 64)
    assert {b for stage in runner.stages for b in stage.programs} == {8, 64}
    prompts = _prompts(llm)
    expected = everything_first.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    got = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    stats = llm.stats()
    assert stats["programs_lowered_while_serving"] == 0
    assert stats["num_programs"] < stats["num_programs_total"] == everything_first.stats()["num_programs"]

    monkeypatch.undo()
    runner.build_in_background().join(timeout=600)
    assert runner.ready_shapes.token_buckets == runner.shapes.token_buckets == (8, 16, 32, 64)
    assert llm.stats()["num_programs"] == llm.stats()["num_programs_total"]
    again = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]
    assert llm.stats()["programs_lowered_while_serving"] == 0


def test_a_background_engine_builds_the_rest_by_itself():
    llm = LLM(BUNDLED_MODEL, **SETTINGS, precompile="background")
    deadline = time.monotonic() + 600
    while llm.stats()["num_programs"] < llm.stats()["num_programs_total"] and time.monotonic() < deadline:
        llm.generate("import os\n", GREEDY, use_tqdm=False)  # serving goes on meanwhile
    assert llm.engine.runner.ready_shapes.token_buckets == (8, 16, 32, 64)
    assert llm.stats()["programs_lowered_while_serving"] == 0


def test_precompile_takes_all_background_true_or_false():
    from jserve.engine_args import EngineArgs

    assert EngineArgs(precompile="all").precompile is True
    assert EngineArgs(precompile="background").precompile == "background"
    with pytest.raises(ValueError, match="precompile must be"):
        EngineArgs(precompile="lazy")
