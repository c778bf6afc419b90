"""Reading PEFT directories: the layout the step uses, checked against peft's own update, and every refusal
named (no engine: host only)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from jserve.config import ModelConfig
from jserve.lora.peft_adapter import load_peft_adapter
from jserve.lora.targets import LoRASpec
from tests.checkpoints import make_checkpoint
from tests.lora.adapters import make_adapter, request


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path, model = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("peft") / "llama")
    return path, model, ModelConfig.from_pretrained(path)


def _spec(cfg, rank=8, targets=None):
    return LoRASpec.for_model(cfg, max_loras=2, max_lora_rank=rank, targets=targets)


@pytest.mark.parametrize(
    "options",
    [{}, dict(use_rslora=True), dict(rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 5, "gate_proj": 3})],
)
def test_each_target_update_equals_peft(llama, tmp_path, options):
    """The low-rank update our layout computes equals peft's, with its scale rules (rsLoRA, per-module
    rank and alpha patterns)."""
    path, base, cfg = llama
    adapter_dir, model = make_adapter(base, tmp_path / "a", seed=3, rank=4, alpha=12, **options)
    adapter = load_peft_adapter(request(adapter_dir, 1), cfg, _spec(cfg), np.float32)
    assert adapter.rank == 4
    x = torch.randn(5, cfg.hidden_size)
    layer = model.base_model.model.model.layers[1]
    for name, module in [("q_proj", layer.self_attn.q_proj), ("gate_proj", layer.mlp.gate_proj)]:
        with torch.no_grad():
            expected = module(x) - module.base_layer(x)  # peft's own low-rank update, scale included
        a, b = adapter.weights[name]
        got = x.numpy() @ a[1].reshape(cfg.hidden_size, -1) @ b[1].reshape(b.shape[1], -1)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
        assert not a[1, ..., 4:].any() and not b[1, 4:].any()  # padded to max_lora_rank with zeros


def _edit_config(adapter_dir, **changes):
    cfg_file = adapter_dir / "adapter_config.json"
    config = json.loads(cfg_file.read_text())
    config.update(changes)
    cfg_file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(use_dora=True), "DoRA"),
        (dict(bias="all"), "bias='all'"),
        (dict(peft_type="PREFIX_TUNING"), "not LORA"),
    ],
)
def test_unsupported_options_are_refused_by_name(llama, tmp_path, change, reason):
    path, base, cfg = llama
    adapter_dir, _ = make_adapter(base, tmp_path / "a", seed=1, targets=["q_proj"])
    _edit_config(adapter_dir, **change)
    with pytest.raises(ValueError, match=reason):
        load_peft_adapter(request(adapter_dir, 1), cfg, _spec(cfg), np.float32)


def test_rank_above_max_lora_rank_is_refused(llama, tmp_path):
    path, base, cfg = llama
    adapter_dir, _ = make_adapter(base, tmp_path / "a", seed=1, rank=16, targets=["v_proj"])
    with pytest.raises(ValueError, match="rank 16 .* exceeds max_lora_rank=8"):
        load_peft_adapter(request(adapter_dir, 1), cfg, _spec(cfg, rank=8), np.float32)


def test_a_target_the_engine_does_not_serve_is_refused(llama, tmp_path):
    path, base, cfg = llama
    adapter_dir, _ = make_adapter(base, tmp_path / "a", seed=1, targets=["q_proj", "down_proj"])
    with pytest.raises(ValueError, match="lora_target_modules"):
        load_peft_adapter(request(adapter_dir, 1), cfg, _spec(cfg, targets=["q_proj", "v_proj"]), np.float32)


def test_an_adapter_of_another_base_model_is_refused(llama, tmp_path):
    path, base, cfg = llama
    other_dir, other = make_checkpoint("llama-gqa", tmp_path / "wide", hidden_size=96)
    adapter_dir, _ = make_adapter(other, tmp_path / "a", seed=1, targets=["q_proj"])
    with pytest.raises(ValueError, match="does not fit the base model"):
        load_peft_adapter(request(adapter_dir, 1), cfg, _spec(cfg), np.float32)


def test_missing_or_broken_files_are_refused(llama, tmp_path):
    path, base, cfg = llama
    spec = _spec(cfg)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft_adapter(request(tmp_path, 1), cfg, spec, np.float32)
    adapter_dir, _ = make_adapter(base, tmp_path / "a", seed=1, targets=["q_proj"])
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not readable"):
        load_peft_adapter(request(adapter_dir, 1), cfg, spec, np.float32)
    weights.unlink()
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_peft_adapter(request(adapter_dir, 1), cfg, spec, np.float32)
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_peft_adapter(request(adapter_dir, 1), cfg, spec, np.float32)
    shutil.rmtree(adapter_dir)


def test_experts_take_no_adapters(tmp_path):
    path, base = make_checkpoint("mixtral", tmp_path / "mixtral")
    cfg = ModelConfig.from_pretrained(path)
    spec = LoRASpec.for_model(cfg, 1, 8)
    assert spec.targets == ("k_proj", "o_proj", "q_proj", "v_proj")  # no dense MLP anywhere
    adapter_dir, _ = make_adapter(base, tmp_path / "a", seed=1, targets=["q_proj", "w1", "w3"])
    with pytest.raises(ValueError, match="mlp.experts: jserve serves adapters on"):
        load_peft_adapter(request(adapter_dir, 1), cfg, spec, np.float32)


def test_phi3_fused_projections_split_like_the_base_weights(tmp_path):
    path, base = make_checkpoint("phi3", tmp_path / "phi3")
    cfg = ModelConfig.from_pretrained(path)
    adapter_dir, model = make_adapter(base, tmp_path / "a", seed=2, targets=["qkv_proj", "gate_up_proj"])
    adapter = load_peft_adapter(request(adapter_dir, 1), cfg, _spec(cfg), np.float32)
    x = torch.randn(3, cfg.hidden_size)
    attn = model.base_model.model.model.layers[0].self_attn.qkv_proj
    with torch.no_grad():
        fused = (attn(x) - attn.base_layer(x)).numpy()
    parts = []
    for name in ("q_proj", "k_proj", "v_proj"):
        a, b = adapter.weights[name]
        parts.append(x.numpy() @ a[0].reshape(cfg.hidden_size, -1) @ b[0].reshape(b.shape[1], -1))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), fused, atol=1e-5)


def test_a_bfloat16_adapter_reads_like_its_float32_original(llama, tmp_path):
    path, base, cfg = llama
    adapter_dir, model = make_adapter(base, tmp_path / "f32", seed=4, rank=4, targets=["q_proj", "down_proj"])
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    f32 = load_peft_adapter(request(adapter_dir, 1), cfg, _spec(cfg), np.float32)
    bf16 = load_peft_adapter(request(tmp_path / "bf16", 2), cfg, _spec(cfg), np.float32)
    for target in ("q_proj", "down_proj"):
        for ours, theirs in zip(bf16.weights[target], f32.weights[target], strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-2, atol=1e-2)


def test_lora_bias_and_layer_replication_are_refused(llama, tmp_path):
    path, base, cfg = llama
    adapter_dir, _ = make_adapter(base, tmp_path / "a", seed=1, targets=["q_proj"])
    for option, reason in (({"lora_bias": True}, "lora_bias"), ({"layer_replication": [[0, 2]]}, "layer_replication")):
        _edit_config(adapter_dir, **{"lora_bias": False, "layer_replication": None, **option})
        with pytest.raises(ValueError, match=reason):
            load_peft_adapter(request(adapter_dir, 1), cfg, _spec(cfg), np.float32)
