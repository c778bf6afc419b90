"""Every supported family against transformers (float32): prompt logprobs and greedy continuations."""

from __future__ import annotations

import jax
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


def _check_against_transformers(ckpt, hf_model, **engine_args) -> LLM:
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
        **engine_args,
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_logprobs[0] is None
        ours = np.array([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
        np.testing.assert_allclose(ours, _hf_prompt_logprobs(hf_model, prompt), atol=LOGPROB_TOL, rtol=0)
        assert out.outputs[0].token_ids == _hf_greedy(hf_model, prompt, NEW_TOKENS)
        assert out.outputs[0].finish_reason == "length"
    return llm


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(family, tmp_path):
    _check_against_transformers(*make_checkpoint(family, tmp_path / family))


@pytest.mark.parametrize(
    ("family", "layers", "period"),
    [
        ("gemma2", 5, 2),  # windowed / global alternate: two stacks, two whole periods and one layer after
        ("gemma3", 8, 6),  # 5 windowed (local RoPE) : 1 global; one whole period and two layers after
        ("qwen3-moe", 3, 2),  # sparse, dense, sparse
        pytest.param("phi3", 2, 1, marks=pytest.mark.slow),  # longrope's per-token lengths inside the loop
    ],
)
def test_scanned_layers_match_transformers(family, layers, period, tmp_path):
    """scan_layers=True: layers that look alike share a stack and the loop runs whole periods of them; the
    tokens and prompt logprobs are transformers' as with unrolled layers."""
    llm = _check_against_transformers(
        *make_checkpoint(family, tmp_path / family, num_hidden_layers=layers), scan_layers=True
    )
    stage = llm.engine.runner.stages[0]
    assert stage.treedef is not None and stage.param_names.count(f"stacked/{period - 1}/input_norm/weight") == 1
    assert f"stacked/{period}/input_norm/weight" not in stage.param_names  # exactly ``period`` stacks


def test_bfloat16_matches_transformers_bfloat16(tmp_path):
    """bf16 weights, activations and KV cache (on CPU the pages hold bf16 bits as uint16, which XLA:CPU scatters
    in place) against transformers run in bf16: prompt logprobs within bf16's rounding of a 2-layer model."""
    ckpt, hf_model = make_checkpoint("llama-gqa", tmp_path / "llama")
    hf_model = hf_model.to(torch.bfloat16)
    prompt = np.random.default_rng(2).integers(3, VOCAB, size=PROMPT_LEN).tolist()
    llm = LLM(model=ckpt, dtype="bfloat16", max_model_len=128, num_pages=32, max_num_seqs=2, page_size=8)
    assert str(llm.engine.runner.kv_dtype) == ("uint16" if jax.default_backend() == "cpu" else "bfloat16")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1, logprobs=1)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    ours = np.array([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
    theirs = _hf_prompt_logprobs(hf_model, prompt)
    np.testing.assert_allclose(ours, theirs, atol=0.05, rtol=0)
    # the continuation reads the prompt's K/V back from the cache: its logprobs match too
    continued = prompt + out.outputs[0].token_ids
    theirs_all = _hf_prompt_logprobs(hf_model, continued)[len(prompt) - 1 :]
    ours_all = [lp[t] for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids, strict=True)]
    np.testing.assert_allclose(ours_all, theirs_all, atol=0.05, rtol=0)
