"""What the newer families need beyond parity (tests/models/test_parity.py): Gemma 2's soft caps must matter,
the Pallas kernels must serve Gemma 2's caps and alternating windows, and the new families quantize on load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from jserve import LLM, SamplingParams
from tests.checkpoints import VOCAB, make_checkpoint
from tests.models.test_parity import _hf_prompt_logprobs

ENGINE = dict(
    dtype="float32",
    max_model_len=96,
    num_pages=32,
    max_num_seqs=4,
    max_num_batched_tokens=64,
    page_size=8,
    precompile=False,
)
PROMPT = np.random.default_rng(5).integers(3, VOCAB, size=40).tolist()  # longer than gemma2's window of 16


def _prompt_logprobs(llm: LLM, prompt: list[int]) -> np.ndarray:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    return np.array([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return make_checkpoint("gemma2", tmp_path_factory.mktemp("gemma2") / "ckpt")


def test_gemma2_soft_caps_are_exceeded_and_applied(gemma2, tmp_path):
    """The checkpoint's raw logits exceed the caps, so an engine that dropped either cap would be off by far
    more than the parity tolerance: this test fails then (checked by running one with the caps removed)."""
    path, hf_model = gemma2
    reference = _hf_prompt_logprobs(hf_model, PROMPT)
    uncapped_hf = type(hf_model)(
        type(hf_model.config)(**{**hf_model.config.to_dict(), "final_logit_softcapping": None})
    )
    uncapped_hf.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        raw = uncapped_hf.eval()(torch.tensor([PROMPT])).logits
    assert float(raw.abs().max()) > 2 * hf_model.config.final_logit_softcapping

    np.testing.assert_allclose(_prompt_logprobs(LLM(model=path, **ENGINE), PROMPT), reference, atol=1e-3, rtol=0)
    for dropped in ("attn_logit_softcapping", "final_logit_softcapping"):
        other = shutil.copytree(path, tmp_path / dropped)
        config = json.loads((other / "config.json").read_text())
        config[dropped] = None
        (other / "config.json").write_text(json.dumps(config))
        ours = _prompt_logprobs(LLM(model=other, **ENGINE), PROMPT)
        assert np.abs(ours - reference).max() > 0.05, dropped  # the cap moves logprobs by far more than 1e-3


def test_gemma2_pallas_kernels_match_xla(gemma2):
    """The Pallas ragged kernel (TPU interpreter on CPU) with Gemma 2's soft cap and alternating windows gives the
    XLA path's greedy tokens."""
    path, _ = gemma2
    prompt = PROMPT[:24]  # past the window of 16
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    settings = {**ENGINE, "max_num_batched_tokens": 32}
    xla = LLM(model=path, attention_backend="xla", **settings)
    pallas = LLM(model=path, attention_backend="pallas", **settings)
    assert pallas.engine.runner.backend.name == "pallas-tpu-interpret"
    want = xla.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0].token_ids
    got = pallas.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == want
