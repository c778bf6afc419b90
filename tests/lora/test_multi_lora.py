"""Multi-LoRA engines against transformers + peft (float32): adapters mixed with the base model in one batch,
more adapters than slots, tensor parallel and stacked layers, and the guarantees around them (batch
invariance, base requests unchanged, prefix cache per adapter, nothing compiled while serving)."""

from __future__ import annotations

import numpy as np
import pytest

from jserve import LLM, SamplingParams
from tests.checkpoints import VOCAB, make_checkpoint
from tests.lora.adapters import greedy, make_adapter, ours, prompt_logprobs, request

LOGPROB_TOL = 2e-3  # the bound; measured: ~2e-6
NEW_TOKENS = 8
ENGINE = dict(dtype="float32", max_model_len=128, num_pages=96, max_num_seqs=8, max_num_batched_tokens=64, page_size=8)


def _prompts(n: int, length: int = 24, seed: int = 5) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=length).tolist() for _ in range(n)]


PARAMS = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama, four adapters of it (different ranks and targets) and an engine with three slots."""
    root = tmp_path_factory.mktemp("multi-lora")
    path, base = make_checkpoint("llama-gqa", root / "base", initializer_range=0.1)
    adapters = [
        make_adapter(base, root / "a1", seed=1, rank=8),
        make_adapter(base, root / "a2", seed=2, rank=4, alpha=8),
        make_adapter(base, root / "a3", seed=3, rank=2, targets=["q_proj", "v_proj"], use_rslora=True),
        make_adapter(base, root / "a4", seed=4, rank=8, targets=["o_proj", "down_proj"]),
    ]
    requests = [request(d, i + 1) for i, (d, _) in enumerate(adapters)]
    llm = LLM(path, enable_lora=True, max_loras=3, max_lora_rank=8, max_cpu_loras=4, progress=False, **ENGINE)
    return llm, base, requests, [m for _, m in adapters], path


@pytest.fixture(scope="module")
def plain(llama):
    """An engine of the same checkpoint without LoRA."""
    return LLM(llama[4], precompile=False, progress=False, **ENGINE)


def _check(out, model, prompt):
    np.testing.assert_allclose(ours(out, prompt), prompt_logprobs(model, prompt), atol=LOGPROB_TOL, rtol=0)
    assert out.outputs[0].token_ids == greedy(model, prompt, NEW_TOKENS)


def test_mixed_batch_matches_peft_and_each_request_alone(llama):
    """Base + three adapters in one batch, each against peft; then each alone gives the same tokens and
    logprobs (batch invariance)."""
    llm, base, requests, models, _ = llama
    prompts = _prompts(4)
    adapters = [None, *requests[:3]]
    mixed = llm.generate(prompt_token_ids=prompts, sampling_params=PARAMS, lora_request=adapters, use_tqdm=False)
    for out, prompt, model in zip(mixed, prompts, [base, *models[:3]], strict=True):
        _check(out, model, prompt)
    for out, prompt, adapter in zip(mixed, prompts, adapters, strict=True):
        (alone,) = llm.generate(prompt_token_ids=[prompt], sampling_params=PARAMS, lora_request=adapter, use_tqdm=False)
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
        np.testing.assert_allclose(ours(alone, prompt), ours(out, prompt), atol=1e-4, rtol=0)  # as batch invariance
    assert llm.stats()["programs_lowered_while_serving"] == 0


def test_more_adapters_than_slots_wait_evict_and_stay_correct(llama):
    """Four adapters (two requests each) and base requests through three slots: an adapter waits for an idle
    slot, evicts the least recently used one, and every output still matches peft."""
    llm, base, requests, models, _ = llama
    before = llm.stats()
    prompts = _prompts(9, length=12, seed=9)
    adapters = [requests[i % 4] for i in range(8)] + [None]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=PARAMS, lora_request=adapters, use_tqdm=False)
    for i, (out, prompt) in enumerate(zip(outs, prompts, strict=True)):
        _check(out, models[i % 4] if i < 8 else base, prompt)
    stats = llm.stats()
    assert stats["lora_evictions"] > before["lora_evictions"]
    assert stats["lora_slot_waits"] > before["lora_slot_waits"]
    assert stats["lora_resident"] == 3 and stats["programs_lowered_while_serving"] == 0
    assert stats["num_running"] == 0 and stats["pages_free"] == stats["pages_total"]
    llm.engine.kv_cache.check_invariants()
    assert llm.engine.scheduler.adapters._users == [0, 0, 0]


def test_prefix_cache_is_shared_within_an_adapter_only(llama):
    llm, _, requests, _, _ = llama
    prompt = _prompts(1, length=41, seed=11)[0]  # 5 whole pages and the token that must be computed
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def cached(adapter) -> int:
        (out,) = llm.generate(prompt_token_ids=[prompt], sampling_params=params, lora_request=adapter, use_tqdm=False)
        return out.metrics.num_cached_tokens

    assert cached(requests[0]) == 0
    assert cached(requests[0]) == 40  # the same adapter's pages
    assert cached(requests[1]) == 0  # another adapter's K/V differ
    assert cached(None) == 0
    assert cached(None) > 0


def test_base_requests_give_the_tokens_of_an_engine_without_lora(llama, plain):
    llm, _, requests, _, _ = llama
    prompts = _prompts(3, seed=13)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    with_lora = llm.generate(
        prompt_token_ids=prompts, sampling_params=params, lora_request=[None, requests[0], None], use_tqdm=False
    )
    without = plain.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    for i in (0, 2):
        assert with_lora[i].outputs[0].token_ids == without[i].outputs[0].token_ids
        np.testing.assert_allclose(
            [d[t] for d, t in zip(with_lora[i].outputs[0].logprobs, with_lora[i].outputs[0].token_ids, strict=True)],
            [d[t] for d, t in zip(without[i].outputs[0].logprobs, without[i].outputs[0].token_ids, strict=True)],
            atol=1e-6,
        )


def test_refusals_name_the_reason_and_leave_the_engine_serving(llama, tmp_path):
    llm, _, requests, _, _ = llama
    prompt = _prompts(1)[0]
    llm.engine.register_adapter(requests[0])  # id 1 names adapter-1 from here on
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate(prompt_token_ids=[prompt], lora_request=request(tmp_path, 9), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_int_id 1 already names adapter"):
        llm.generate(prompt_token_ids=[prompt], lora_request=request(tmp_path, 1), use_tqdm=False)
    with pytest.raises(ValueError, match="lora_request: got 2 for 1 prompts"):
        llm.generate(prompt_token_ids=[prompt], lora_request=[None, None], use_tqdm=False)
    (out,) = llm.generate(prompt_token_ids=[prompt], sampling_params=PARAMS, lora_request=requests[0], use_tqdm=False)
    assert len(out.outputs[0].token_ids) == NEW_TOKENS
    assert llm.engine.stats()["num_waiting"] == 0


def test_an_engine_without_lora_refuses_adapters(llama, plain):
    _, _, requests, _, _ = llama
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate(prompt_token_ids=_prompts(1), lora_request=requests[0], use_tqdm=False)


@pytest.mark.parametrize(
    ("family", "engine_args"),
    [
        ("qwen2-tied", {}),
        ("gemma", dict(tensor_parallel_size=2, scan_layers=True)),
        ("llama-gqa", dict(pipeline_parallel_size=2)),
        ("llama-gqa", dict(speculative_model="ngram", num_speculative_tokens=3, speculative_adaptive=False)),
    ],
    ids=["qwen2", "gemma-tp2-scan", "llama-pp2", "llama-ngram"],
)
def test_families_and_engine_modes_match_peft(tmp_path, family, engine_args):
    """Qwen2 and Gemma, and adapters under tensor parallelism with stacked layers, pipeline stages (each
    stage writes its layers' slots) and n-gram speculation (verification applies the adapter)."""
    path, base = make_checkpoint(family, tmp_path / family, initializer_range=0.1)
    adapter_dir, model = make_adapter(base, tmp_path / "a", seed=6, rank=4)
    llm = LLM(
        path, enable_lora=True, max_loras=1, max_lora_rank=4, precompile=False, progress=False, **ENGINE, **engine_args
    )
    prompts = [(p[:5] * 5)[:24] for p in _prompts(2, seed=17)]  # repeats: n-gram speculation drafts from them
    outs = llm.generate(
        prompt_token_ids=prompts, sampling_params=PARAMS, lora_request=[request(adapter_dir, 1), None], use_tqdm=False
    )
    _check(outs[0], model, prompts[0])
    _check(outs[1], base, prompts[1])
    if "speculative_model" in engine_args:
        assert llm.stats()["spec_num_draft_tokens"] > 0
