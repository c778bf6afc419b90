"""Async scheduling (step N+1 dispatched before step N's tokens reach the host) changes no output.

The same 64 mixed requests run with async on and off: greedy (with and without penalties, which read the
pending token from the device), seeded sampling, stop strings and stop ids that end requests while the next
step is already on the device, n > 1, prompt logprobs, under forced preemption and chunked prefill.
"""

from __future__ import annotations

import numpy as np
import pytest

from jserve import LLM, SamplingParams

COMMON = dict(dtype="float32", max_model_len=160, page_size=8, max_num_seqs=16, max_num_batched_tokens=64)


def _requests(tokenizer) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(7)
    prompts, params = [], []
    for i in range(64):
        prompts.append(rng.integers(3, 500, size=int(rng.integers(2, 90))).tolist())
        kind = i % 8
        options: dict = dict(max_tokens=int(rng.integers(1, 14)), temperature=0.0)
        if kind == 1:
            options.update(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3)
        elif kind == 2:
            options.update(temperature=0.9, top_p=0.9, seed=int(rng.integers(1 << 30)))
        elif kind == 3:  # a stop string found while the next step is on the device
            options.update(stop=[tokenizer.decode([int(rng.integers(3, 500))])[:1] or "e"], max_tokens=20)
        elif kind == 4:
            options.update(stop_token_ids=[int(t) for t in rng.integers(3, 500, size=8)], max_tokens=20)
        elif kind == 5:
            options.update(n=2, temperature=0.8, seed=int(rng.integers(1 << 30)))
        elif kind == 6:
            options.update(prompt_logprobs=2, logprobs=3)
        elif kind == 7:
            options.update(min_tokens=2, max_tokens=12, temperature=0.7, top_k=20, seed=int(rng.integers(1 << 30)))
        params.append(SamplingParams(**options))
    return prompts, params


def _summary(outputs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def _logprob_values(outputs) -> tuple[list, np.ndarray]:
    """(the ids of every logprob entry, their values): batches differ between the modes, so values agree to
    float rounding (another bucket, another reduction order), ids exactly."""
    ids, values = [], []
    for o in outputs:
        entries = [e for e in (o.prompt_logprobs or []) if e] + [e for c in o.outputs for e in (c.logprobs or [])]
        for entry in entries:
            ids.append(sorted(entry))
            values.extend(entry[k] for k in sorted(entry))
    return ids, np.asarray(values)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    return {mode: LLM(model=tiny_model_dir, num_pages=40, async_scheduling=mode, **COMMON) for mode in (True, False)}


def test_async_on_and_off_give_identical_outputs(engines):
    on, off = engines[True], engines[False]
    assert on.engine.async_scheduling and not off.engine.async_scheduling
    prompts, params = _requests(on.tokenizer)
    got = {
        mode: llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        for mode, llm in engines.items()
    }
    assert _summary(got[True]) == _summary(got[False])
    (ids_on, lp_on), (ids_off, lp_off) = _logprob_values(got[True]), _logprob_values(got[False])
    assert ids_on == ids_off and len(lp_on) > 100
    np.testing.assert_allclose(lp_on, lp_off, atol=1e-4)
    for llm in engines.values():
        stats = llm.stats()
        assert stats["num_preemptions"] > 0  # 40 pages of 8 tokens cannot hold 16 running sequences
        assert stats["pages_free"] == stats["pages_total"]
    reasons = {c.finish_reason for o in got[True] for c in o.outputs}
    assert reasons == {"stop", "length"}


def test_seeded_sampling_alone_equals_in_a_batch(engines):
    llm = engines[True]
    prompts, _ = _requests(llm.tokenizer)
    seeded = SamplingParams(temperature=1.0, max_tokens=10, seed=99, ignore_eos=True)
    alone = llm.generate(prompt_token_ids=[prompts[0]], sampling_params=seeded, use_tqdm=False)[0]
    batch = llm.generate(
        prompt_token_ids=prompts[:24],
        sampling_params=[seeded] + [SamplingParams(temperature=0.5, max_tokens=12)] * 23,
        use_tqdm=False,
    )
    assert batch[0].outputs[0].token_ids == alone.outputs[0].token_ids


def test_aborts_while_a_step_is_on_the_device_free_everything(engines):
    engine = engines[True].engine
    rng = np.random.default_rng(3)
    ids = []
    for i in range(12):
        ids.append(engine.add_request(rng.integers(3, 500, size=30).tolist(), SamplingParams(max_tokens=30)))
        engine.step()
        if i % 3 == 2:
            engine.abort_request(ids[-2])  # one running (its next token is in flight)
    engine.abort_request(engine.add_request([5, 6, 7], SamplingParams(max_tokens=5)))  # one still queued
    while engine.has_unfinished():
        engine.step()
    stats = engine.stats()
    assert stats["pages_free"] == stats["pages_total"] and stats["num_running"] == stats["num_waiting"] == 0
