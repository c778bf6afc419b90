"""Batch invariance with adapters, as a property: a probed request (with an adapter or none) gets the same
tokens and logprobs alone as in a batch of 16 whose other requests carry drawn adapters, more adapters than
slots, so the batch also parks requests waiting for a slot and swaps adapters through the slots meanwhile.
The batches are test_batch_invariance's (prompt sharing, chunking, sampling kinds); float32, logprobs within
1e-4, tokens identical."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jserve import LLM, RequestOutput
from tests.checkpoints import make_checkpoint
from tests.engine.test_batch_invariance import ENGINE, EXAMPLES, Request, _assert_logprobs_equal, batches
from tests.lora.adapters import make_adapter, request

NUM_ADAPTERS = 3


@pytest.fixture(scope="module")
def lora_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-invariance")
    path, base = make_checkpoint("llama-gqa", root / "base", initializer_range=0.1)
    adapters = [
        request(make_adapter(base, root / f"a{i}", seed=i, rank=4 * (i + 1), alpha=8)[0], i + 1)
        for i in range(NUM_ADAPTERS)
    ]
    llm = LLM(path, enable_lora=True, max_loras=2, max_lora_rank=12, **{**ENGINE, "precompile": True})
    return llm, [None, *adapters]


def _generate(llm: LLM, requests: list[Request], adapters: list) -> list[RequestOutput]:
    return llm.generate(
        prompt_token_ids=[list(r.prompt) for r in requests],
        sampling_params=[r.params for r in requests],
        lora_request=adapters,
        use_tqdm=False,
    )


@EXAMPLES
@given(batch=batches(), data=st.data())
def test_adapters_keep_batch_invariance(lora_engine, batch, data):
    llm, choices = lora_engine
    probe, requests = batch
    position = requests.index(probe)
    adapters = [data.draw(st.sampled_from(choices)) for _ in requests]
    (alone,) = _generate(llm, [probe], [adapters[position]])
    batched = _generate(llm, requests, adapters)[position]
    assert batched.outputs[0].token_ids == alone.outputs[0].token_ids
    _assert_logprobs_equal(alone.prompt_logprobs, batched.prompt_logprobs)
    _assert_logprobs_equal(alone.outputs[0].logprobs, batched.outputs[0].logprobs)
    stats = llm.stats()
    assert stats["programs_lowered_while_serving"] == 0 and stats["num_running"] == stats["num_waiting"] == 0
    llm.engine.kv_cache.check_invariants()
