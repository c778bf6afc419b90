"""The engine with attention_backend="pallas" (the TPU kernel under its CPU interpreter): same greedy tokens as
the XLA path, on one device and with the kernel running on local heads inside shard_map (tp=2 splits kv heads,
tp=4 > 2 kv heads replicates them)."""

from __future__ import annotations

import pytest

from jserve import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(20, 45))]
KWARGS = dict(
    dtype="float32",
    max_model_len=64,
    page_size=8,
    num_pages=32,
    max_num_seqs=4,
    max_num_batched_tokens=16,
    precompile=False,
)
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def _tokens(llm: LLM) -> list[list[int]]:
    return [
        o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    ]


@pytest.fixture(scope="module")
def xla_tokens(tiny_model_dir):
    return _tokens(LLM(model=tiny_model_dir, attention_backend="xla", **KWARGS))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_pallas_backend_matches_xla(tiny_model_dir, xla_tokens, tp):
    llm = LLM(model=tiny_model_dir, attention_backend="pallas", tensor_parallel_size=tp, **KWARGS)
    assert llm.engine.runner.backend.name == "pallas-tpu-interpret"
    assert _tokens(llm) == xla_tokens
