"""int8 / fp8 KV cache (per-token-and-head scales): greedy agreement with a float cache, page accounting through
preemption and prefix caching, pool sizing, tensor parallelism, and the Pallas kernel path."""

from __future__ import annotations

import pytest

from jserve import LLM, SamplingParams
from tests.checkpoints import make_checkpoint
from tests.engine.workloads import assert_no_leak, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
COMMON = dict(dtype="float32", max_model_len=160, page_size=8, max_num_seqs=16, precompile=False)
# Of 32 prompts x 12 greedy tokens on the tiny random model, sequences identical to the float cache's
# (measured: int8 27/32, fp8 20/32; prompt logprobs move by 0.005 / 0.022 nats on average, and a near-tie
# flipped early parts the sequences). e4m3 keeps 3 mantissa bits, int8 with a per-token scale ~7.
MIN_IDENTICAL = {"int8": 24, "fp8": 17}


def _tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def prompts32():
    return random_prompts(32, 4, 90)


@pytest.fixture(scope="module")
def float_tokens(tiny_model_dir, prompts32):
    return _tokens(LLM(model=tiny_model_dir, num_pages=256, max_num_batched_tokens=128, **COMMON), prompts32)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_quantized_cache_agrees_with_float_cache(tiny_model_dir, prompts32, float_tokens, kv_cache_dtype):
    llm = LLM(model=tiny_model_dir, num_pages=256, max_num_batched_tokens=128, kv_cache_dtype=kv_cache_dtype, **COMMON)
    ours = _tokens(llm, prompts32)
    identical = sum(a == b for a, b in zip(ours, float_tokens, strict=True))
    assert identical >= MIN_IDENTICAL[kv_cache_dtype], identical
    assert_no_leak(llm)


def test_preemption_and_prefix_caching_with_an_int8_cache(tiny_model_dir):
    """Cached prefix pages hold the same int8 values and scales a recompute would write, and preempted
    requests recompute them: outputs equal a roomy engine's without prefix caching, and no page leaks."""
    prefix = random_prompts(1, 48, 48, seed=7)[0]
    prompts = [prefix + s for s in random_prompts(24, 3, 40, seed=8)]
    roomy = LLM(
        model=tiny_model_dir,
        num_pages=256,
        max_num_batched_tokens=128,
        kv_cache_dtype="int8",
        enable_prefix_caching=False,
        **COMMON,
    )
    tight = LLM(model=tiny_model_dir, num_pages=40, max_num_batched_tokens=128, kv_cache_dtype="int8", **COMMON)
    expected = _tokens(roomy, prompts)
    assert _tokens(tight, prompts) == expected
    stats = tight.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_rate"] > 0
    assert_no_leak(tight)
    assert_no_leak(roomy)


def test_pool_holds_about_twice_the_pages_at_the_same_memory(tmp_path, sp_model):
    """bf16 pages vs int8 pages + a float32 scale per token and head: 2 * head_dim / (head_dim + 4) more pages."""
    path, _ = make_checkpoint("llama-gqa", tmp_path / "hd64", head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    sized = dict(dtype="bfloat16", max_model_len=64, page_size=8, max_num_seqs=512, precompile=False)
    pages = {}
    for kv in ("auto", "int8", "fp8"):
        llm = LLM(model=path, kv_cache_memory_fraction=0.0005, kv_cache_dtype=kv, **sized)
        pages[kv] = llm.stats()["pages_total"]
        per_token = llm.stats()["kv_bytes_per_token"]
        assert per_token == 2 * 2 * 1 * (64 * (2 if kv == "auto" else 1) + (0 if kv == "auto" else 4))
    expected = 2 * 64 / (64 + 4)  # 1.88
    for kv in ("int8", "fp8"):
        assert abs(pages[kv] / pages["auto"] - expected) < 0.02, pages


def test_tensor_parallel_int8_cache_equals_single_device(tiny_model_dir):
    prompts = random_prompts(6, 5, 40, seed=3)
    one = LLM(model=tiny_model_dir, num_pages=128, max_num_batched_tokens=64, kv_cache_dtype="int8", **COMMON)
    two = LLM(
        model=tiny_model_dir,
        num_pages=128,
        max_num_batched_tokens=64,
        kv_cache_dtype="int8",
        tensor_parallel_size=2,
        **COMMON,
    )
    assert _tokens(two, prompts) == _tokens(one, prompts)


def test_pallas_kernel_reads_the_int8_cache_like_the_xla_path(tiny_model_dir):
    """attention_backend='pallas' on CPU runs the TPU kernel under its interpreter (slow: a small step)."""
    prompts = random_prompts(3, 5, 20, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    small = dict(COMMON, max_model_len=64, max_num_seqs=4)
    xla = LLM(model=tiny_model_dir, num_pages=32, max_num_batched_tokens=32, kv_cache_dtype="int8", **small)
    pallas = LLM(
        model=tiny_model_dir,
        num_pages=32,
        max_num_batched_tokens=32,
        kv_cache_dtype="int8",
        attention_backend="pallas",
        **small,
    )
    assert _tokens(pallas, prompts, params) == _tokens(xla, prompts, params)
