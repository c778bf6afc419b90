"""Weight quantization: quantize-on-load against an independent numpy fake-quantized transformers model, and
compressed-tensors checkpoints made by llm-compressor against transformers' own loading of them."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from jserve import LLM, SamplingParams
from tests.checkpoints import VOCAB, make_checkpoint

# Dimensions are multiples of 128 so llm-compressor's default groups of 128 apply; head_dim 32 makes o_proj's
# groups span four heads.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
PROMPT = np.random.default_rng(3).integers(3, VOCAB, size=30).tolist()
ENGINE = dict(
    dtype="float32",
    max_model_len=64,
    num_pages=16,
    max_num_seqs=2,
    max_num_batched_tokens=32,
    page_size=8,
    precompile=False,
)
MATCH_TOL = 2e-3  # ours vs the same quantized weights in transformers (float32 compute)
# Max |logprob delta| against the unquantized model on random weights (measured over two seeds: int8 0.02,
# fp8 0.06-0.10, int4 g32 0.20-0.52, int4 g128 0.44-0.55); the bounds leave room for other seeds and still catch
# a wrong scale or layout (which moves logprobs by whole nats). The trained model's perplexities are in README.
DRIFT_BOUND = {"int8": 0.05, "fp8": 0.25, "int4-32": 1.0, "int4-128": 1.2}


def _prompt_logprobs(llm: LLM) -> np.ndarray:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=params, use_tqdm=False)[0]
    return np.array([out.prompt_logprobs[i][PROMPT[i]] for i in range(1, len(PROMPT))])


def _hf_prompt_logprobs(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].double(), dim=-1)
    return np.array([float(logprobs[i - 1, PROMPT[i]]) for i in range(1, len(PROMPT))])


def _fake_quantize(weight: np.ndarray, method: str, group: int | None) -> np.ndarray:
    """Symmetric absmax quantize-dequantize of an nn.Linear weight [out, in], written independently of jserve:
    each group's absmax maps to qmax (127, 7; 448 for fp8), values round to nearest."""
    out, inp = weight.shape
    w = weight.reshape(out, -1, group if group else inp).astype(np.float64)
    absmax = np.abs(w).max(axis=-1, keepdims=True)
    if method == "fp8":
        scale = np.maximum(absmax, 1e-30) / 448.0
        q = (w / scale).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    else:
        qmax = 127 if method == "int8" else 7
        scale = np.maximum(absmax, 1e-30) / qmax
        q = np.clip(np.round(w / scale), -qmax, qmax)
    scale = scale.astype(np.float32).astype(np.float64)  # jserve keeps float32 scales
    return (q * scale).reshape(out, inp).astype(np.float32)


def _fake_quantized_model(model: torch.nn.Module, method: str, group: int | None) -> torch.nn.Module:
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head" and not name.endswith("mlp.gate"):
                module.weight.copy_(torch.from_numpy(_fake_quantize(module.weight.numpy(), method, group)))
        for name, p in model.named_parameters():
            if ".experts." in name:  # transformers' fused experts [E, out, in]: each expert's rows on their own
                p.copy_(torch.from_numpy(np.stack([_fake_quantize(e, method, group) for e in p.numpy()])))
    return model


def dense_checkpoint(out_dir: Path) -> tuple[Path, torch.nn.Module]:
    """The random Llama every quantization test starts from (also tests/engine/test_batch_invariance.py's)."""
    return make_checkpoint("llama-gqa", out_dir, initializer_range=0.05, **SHAPE)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return dense_checkpoint(tmp_path_factory.mktemp("quant") / "dense")


@pytest.fixture(scope="module")
def dense_logprobs(dense):
    return _hf_prompt_logprobs(dense[1])


@pytest.mark.parametrize(
    "method, group, key",
    [("int8", None, "int8"), ("fp8", None, "fp8"), ("int4", 32, "int4-32"), ("int4", None, "int4-128")],
)
def test_quantize_on_load_matches_fake_quantized_reference(dense, dense_logprobs, method, group, key):
    path, model = dense
    kwargs = {"quantization_group_size": group} if group else {}
    llm = LLM(model=path, quantization=method, **ENGINE, **kwargs)
    ours = _prompt_logprobs(llm)
    reference = _hf_prompt_logprobs(_fake_quantized_model(model, method, group or (128 if method == "int4" else None)))
    np.testing.assert_allclose(ours, reference, atol=MATCH_TOL, rtol=0)
    drift = np.abs(ours - dense_logprobs).max()
    assert 0 < drift < DRIFT_BOUND[key], drift


def test_weight_bytes_shrink_with_bits(dense):
    from jserve.engine_args import EngineArgs
    from jserve.launch import _model_card

    path, _ = dense
    llms = {q: LLM(model=path, quantization=q, **ENGINE) for q in (None, "int8", "int4")}
    sizes = {q: llm.stats()["weight_bytes"] for q, llm in llms.items()}
    card = _model_card(llms["int4"].engine, EngineArgs(model=str(path), quantization="int4", **ENGINE), "m")
    assert card.quantization == "int4 weights (groups of 128)"  # GetModelInfo.quantization
    # embedding and LM head stay float32 (2 x 512 x 128 x 4 bytes): only the linears shrink
    embed = 2 * VOCAB * 128 * 4
    linear = {q: sizes[q] - embed for q in sizes}
    assert linear["int8"] < linear[None] / 3.5 and linear["int4"] < linear["int8"] / 1.8, sizes


def test_moe_experts_are_quantized(tmp_path):
    path, model = make_checkpoint("mixtral", tmp_path / "moe", initializer_range=0.05, **SHAPE)
    llm = LLM(model=path, quantization="int8", **ENGINE)
    reference = _hf_prompt_logprobs(_fake_quantized_model(model, "int8", None))
    np.testing.assert_allclose(_prompt_logprobs(llm), reference, atol=MATCH_TOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "qwen3-moe", "gemma2", "phi3"])
def test_newer_families_quantize_on_load(tmp_path, family):
    """int8 on load for Qwen3 (q/k norms), Qwen3-MoE (experts), Gemma 2 and Phi-3 (fused qkv / gate_up split on
    load, then quantized per output channel, which splitting does not change)."""
    extra = {}
    if family == "phi3":  # head_dim 32 here: longrope needs 16 factors
        factors = [1.0 + 0.05 * i for i in range(16)]
        extra["rope_scaling"] = {"type": "longrope", "short_factor": factors, "long_factor": factors[::-1]}
    path, model = make_checkpoint(family, tmp_path / family, initializer_range=0.05, **SHAPE, **extra)
    llm = LLM(model=path, quantization="int8", **ENGINE)
    reference = _hf_prompt_logprobs(_fake_quantized_model(model, "int8", None))
    np.testing.assert_allclose(_prompt_logprobs(llm), reference, atol=MATCH_TOL, rtol=0)


def test_int4_tensor_parallel_matches_single_device(dense):
    path, _ = dense
    one = LLM(model=path, quantization="int4", quantization_group_size=32, **ENGINE)
    two = LLM(model=path, quantization="int4", quantization_group_size=32, tensor_parallel_size=2, **ENGINE)
    np.testing.assert_allclose(_prompt_logprobs(two), _prompt_logprobs(one), atol=1e-4, rtol=0)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    a = one.generate(prompt_token_ids=[PROMPT], sampling_params=params, use_tqdm=False)[0].outputs[0].token_ids
    b = two.generate(prompt_token_ids=[PROMPT], sampling_params=params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


# ------------------------------------------------------------------ compressed-tensors (llm-compressor)


def _compress(dense_dir, out_dir, scheme) -> str:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    if isinstance(scheme, str):
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    else:
        recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(out_dir, save_compressed=True)
    return out_dir


INT4_CHANNEL = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"},
}
COMPRESSED_SCHEMES = ("W8A16", "W4A16", "FP8_DYNAMIC", "int4-channel")


def compressed_checkpoint(dense_dir, out_dir, scheme: str) -> str:
    """One of COMPRESSED_SCHEMES (llm-compressor's preset names, and int4 with channel scales)."""
    return _compress(dense_dir, out_dir, INT4_CHANNEL if scheme == "int4-channel" else scheme)


@pytest.mark.parametrize("scheme", COMPRESSED_SCHEMES)
def test_compressed_tensors_matches_transformers(dense, tmp_path, scheme):
    path = compressed_checkpoint(dense[0], tmp_path / scheme, scheme)
    fmt = json.loads((tmp_path / scheme / "config.json").read_text())["quantization_config"]["format"]
    assert fmt == ("float-quantized" if scheme == "FP8_DYNAMIC" else "pack-quantized")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    llm = LLM(model=path, **ENGINE)
    np.testing.assert_allclose(_prompt_logprobs(llm), _hf_prompt_logprobs(hf), atol=MATCH_TOL, rtol=0)


# Prompts whose logprobs moved by 1.7e-2 to 3.1e-2 when two others shared their step (jax 0.10, XLA:CPU); of 300
# random 12-token prompts on this checkpoint 15 moved by more than 1e-5 before the fix, none (not by an ulp) after.
BATCH_DEPENDENT_PROMPTS = [
    [457, 411, 74, 473, 497, 138, 220, 277, 337, 228, 78, 476],
    [285, 429, 364, 388, 438, 354, 203, 467, 286, 421, 55, 94],
    [51, 271, 505, 118, 139, 398, 98, 89, 112, 296, 259, 275],
    [369, 465, 497, 153, 293, 221, 273, 291, 324, 183, 136, 235],
]


def test_fp8_dynamic_logprobs_do_not_depend_on_the_batch(dense, tmp_path):
    """Each token's activations are rounded to e4m3 on their own, so a prompt's logprobs must not move when
    other prompts share its step. They moved by up to 3e-2: the products and RMSNorm summed a token's values in
    an order XLA picks from the step's token count, and the rounding turned that ulp into whole e4m3 steps."""
    llm = LLM(model=compressed_checkpoint(dense[0], tmp_path / "fp8", "FP8_DYNAMIC"), **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    others = [list(range(20, 40)), list(range(50, 60))]  # the first shares the probe's step (32 tokens, not 16)
    for prompt in BATCH_DEPENDENT_PROMPTS:
        alone, batched = (
            llm.generate(prompt_token_ids=batch, sampling_params=params, use_tqdm=False)[0]
            for batch in ([prompt], [prompt, *others])
        )
        for i in range(1, len(prompt)):
            assert batched.prompt_logprobs[i][prompt[i]] == pytest.approx(alone.prompt_logprobs[i][prompt[i]], abs=1e-5)


def _with_quantization_config(src, dst, qc: dict):
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _qc(**weights) -> dict:
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128, **weights}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}},
    }


@pytest.mark.parametrize(
    "qc, match",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
        (_qc(symmetric=False), "asymmetric"),
        (_qc(num_bits=3), "3 bits"),
        (_qc(actorder="group"), "actorder"),
        ({**_qc(), "format": "marlin-24"}, "format 'marlin-24'"),
        ({**_qc(), "kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
        ({**_qc(), "ignore": ["lm_head", "re:.*down_proj"]}, "ignore"),
    ],
)
def test_unsupported_quantization_config_is_a_clear_error(dense, tmp_path, qc, match):
    path = _with_quantization_config(dense[0], tmp_path / "bad", qc)
    with pytest.raises(ValueError, match=match):
        LLM(model=path, **ENGINE)


def test_fused_projection_checkpoints_must_quantize_on_load(tmp_path):
    path, _ = make_checkpoint("phi3", tmp_path / "phi3")
    bad = _with_quantization_config(path, tmp_path / "bad", _qc())
    with pytest.raises(ValueError, match="fused projections"):
        LLM(model=bad, **ENGINE)


def test_bad_combinations_are_clear_errors(dense, tmp_path):
    path, _ = dense
    with pytest.raises(ValueError, match="quantization must be"):
        LLM(model=path, quantization="int3", **ENGINE)
    with pytest.raises(ValueError, match="quantization_group_size applies to int4 only"):
        LLM(model=path, quantization="int8", quantization_group_size=64, **ENGINE)
    with pytest.raises(ValueError, match="quantization_group_size is set but quantization is None"):
        LLM(model=path, quantization_group_size=64, **ENGINE)
    with pytest.raises(ValueError, match="does not divide q_proj's input dim 128"):
        LLM(model=path, quantization="int4", quantization_group_size=96, **ENGINE)
    with pytest.raises(ValueError, match="do not split evenly over tensor_parallel_size"):
        # down_proj's 256 inputs over 4 devices: 64 rows each, but its groups of 128 rows would span two devices
        LLM(model=path, quantization="int4", tensor_parallel_size=4, **ENGINE)
    compressed = _compress(path, tmp_path / "w8", "W8A16")
    with pytest.raises(ValueError, match="already quantized"):
        LLM(model=compressed, quantization="int8", **ENGINE)
