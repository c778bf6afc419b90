"""Every supported family against transformers (float32): prompt logprobs and greedy continuations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jserve import LLM, SamplingParams
from tests.checkpoints import FAMILIES, VOCAB, make_checkpoint

PROMPT_LEN = 40  # longer than mistral-window's sliding window of 16
NEW_TOKENS = 16
LOGPROB_TOL = 1e-3


def _hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def _hf_prompt_logprobs(model: torch.nn.Module, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return np.array([float(logprobs[i - 1, prompt[i]]) for i in range(1, len(prompt))])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(family, tmp_path):
    ckpt, hf_model = make_checkpoint(family, tmp_path / family)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, size=PROMPT_LEN).tolist(), rng.integers(3, VOCAB, size=7).tolist()]
    llm = LLM(
        model=ckpt,
        dtype="float32",
        max_model_len=128,
        num_pages=32,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        page_size=8,
        precompile=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_logprobs[0] is None
        ours = np.array([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
        np.testing.assert_allclose(ours, _hf_prompt_logprobs(hf_model, prompt), atol=LOGPROB_TOL, rtol=0)
        assert out.outputs[0].token_ids == _hf_greedy(hf_model, prompt, NEW_TOKENS)
        assert out.outputs[0].finish_reason == "length"
