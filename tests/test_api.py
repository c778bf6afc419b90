"""The public API (docs/api.md): the bundled default model, validation errors naming the field, chat, stats."""

from __future__ import annotations

import pytest

from jserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=128, max_num_seqs=8, num_pages=64, max_num_batched_tokens=64, precompile=False)


def test_bundled_model_generates_text(llm):
    out = llm.generate(["Hello, my name is", "The capital of"], SamplingParams(max_tokens=8, seed=0), use_tqdm=False)
    assert [o.prompt for o in out] == ["Hello, my name is", "The capital of"]
    for o in out:
        assert o.finished and o.prompt_token_ids[0] == llm.tokenizer.bos_token_id
        assert len(o.outputs[0].token_ids) <= 8 and o.outputs[0].finish_reason in ("stop", "length")
        assert o.metrics.first_token_time >= o.metrics.arrival_time
        assert o.metrics.num_prompt_tokens == len(o.prompt_token_ids)


def test_final_only_text_equals_the_streamed_text(llm):
    """generate() without stop strings decodes each sample's text once, at the end; streaming decodes it token by
    token. Both must equal the tokenizer's decode of the tokens (sampled text: multi-byte characters, spaces)."""
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=7, n=2)
    prompts = ["def parse(", "Ünïcode — ", "x = [1, 2"]
    finals = llm.generate(prompts, params, use_tqdm=False)
    for prompt, final in zip(prompts, finals, strict=True):
        for sample in final.outputs:
            assert sample.text == llm.tokenizer.decode(sample.token_ids)
        streamed = "".join(
            d.outputs[0].text
            for d in llm.generate_stream(prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=7))
        )
        one = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=7), use_tqdm=False)[0]
        assert streamed == one.outputs[0].text


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2**63), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2**63), "max_tokens"),
        (dict(temperature=1e39), "temperature"),
        (dict(temperature=10**400), "temperature"),
        (dict(repetition_penalty=1e-46), "repetition_penalty"),
        (dict(seed=2**64), "seed"),
        (dict(priority=-(2**63) - 1), "priority"),
        (dict(stop_token_ids=[2**63]), "stop_token_ids"),
        (dict(n=0), "n"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(logprobs=-1), "logprobs"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(seed=-3), "seed"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_sampling_params_normalise_as_vllm_does():
    """top_k -1 means no limit (as 0 does); a positive temperature below 0.01 is raised to it (vLLM's floor);
    the widest seed and top_k are accepted (top_k past the vocabulary is no limit, seeds fold to 32 bits)."""
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=1e-30).temperature == 0.01
    assert SamplingParams(temperature=0.0).temperature == 0.0
    assert SamplingParams(seed=2**64 - 1, top_k=2**63 - 1).seed == 2**64 - 1


def test_invalid_prompts_name_the_field_and_leave_the_engine_working(llm):
    with pytest.raises(ValueError, match="^prompt must not be empty"):
        llm.generate(prompt_token_ids=[[]], use_tqdm=False)
    with pytest.raises(ValueError, match="^prompt must be a non-empty string"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="^prompt is too long: 200 tokens, max_model_len is 128"):
        llm.generate(prompt_token_ids=[[5] * 200], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: ids outside the vocabulary"):
        llm.generate(prompt_token_ids=[[5, 6, llm.engine.vocab_size]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: ids outside the vocabulary"):
        llm.generate(prompt_token_ids=[[5, -1]], use_tqdm=False)
    with pytest.raises(ValueError, match="^prompt_token_ids must hold integers"):
        llm.generate(prompt_token_ids=[[5, "x"]], use_tqdm=False)
    with pytest.raises(ValueError, match="^stop_token_ids"):
        llm.generate("hi", SamplingParams(stop_token_ids=[10**9]), use_tqdm=False)
    with pytest.raises(ValueError, match="^sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    # a batch with one bad prompt enqueues nothing
    with pytest.raises(ValueError, match="^prompt is too long"):
        llm.generate(prompt_token_ids=[[5, 6], [5] * 500], use_tqdm=False)
    stats = llm.stats()
    assert stats["num_waiting"] == stats["num_running"] == 0
    assert stats["pages_free"] == stats["pages_total"]
    assert llm.generate("still fine", SamplingParams(max_tokens=3), use_tqdm=False)[0].finished


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(dtype="int3"), "dtype"),
        (dict(quantization="int2"), "quantization"),
        (dict(quantization_group_size=64), "quantization_group_size"),
        (dict(kv_cache_dtype="int4"), "kv_cache_dtype"),
        (dict(speculative_model="/no/draft", num_speculative_tokens=2), "speculative_model"),
        (dict(speculative_model="ngram"), "num_speculative_tokens"),
        (dict(num_speculative_tokens=2), "num_speculative_tokens"),
        (dict(speculative_model="ngram", num_speculative_tokens=2, prompt_lookup_min=5), "prompt_lookup_min"),
        (dict(attention_backend="cuda"), "attention_backend"),
        (dict(page_size=12), "page_size"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(model="/nonexistent/model/dir"), "model"),
    ],
)
def test_invalid_engine_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        LLM(**kwargs)


def test_chat_applies_the_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    chat = llm.chat(messages, params, use_tqdm=False)[0]
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat.prompt_token_ids == ids
    direct = llm.generate(prompt_token_ids=[ids], sampling_params=params, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids


def test_stats_keys(llm):
    stats = llm.stats()
    for key in (
        "pages_total",
        "pages_free",
        "pages_cached",
        "num_running",
        "num_waiting",
        "num_preemptions",
        "prefix_cache_hit_rate",
        "prompt_tokens_computed",
    ):
        assert key in stats
    assert stats["pages_total"] == 63


def test_kv_pool_is_sized_from_device_memory():
    # CPU devices report no memory stats: the budget is 1 GiB, of which this fraction goes to pages of
    # 2 (k, v) x 4 layers x 4 kv heads x 16 tokens x 32 dims x 4 bytes = 64 KiB in float32 (half in bf16, which
    # the bundled bf16 checkpoint runs in on CPUs with native bf16)
    small = LLM(kv_cache_memory_fraction=0.002, max_num_seqs=64, max_num_batched_tokens=64, precompile=False)
    pages = small.stats()["pages_total"]
    per_float32 = 4 // small.engine.runner.kv_dtype.itemsize
    assert 20 * per_float32 <= pages <= 40 * per_float32
    assert small.engine.max_model_len == pages * 16  # the default max_model_len is capped by the pool
    # plenty of memory: never more pages than can be used
    capped = LLM(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, precompile=False)
    assert capped.stats()["pages_total"] == 4 * 128 // 16
