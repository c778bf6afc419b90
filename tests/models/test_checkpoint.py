"""Checkpoint loading: sharded == single file, Orbax round trip, bf16, and clear errors for bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from jserve.checkpoint import cpu_has_native_bf16, load_params, resolve_dtype
from jserve.config import ModelConfig
from tests.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path, _ = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("ckpt") / "single")
    return path


def _flat(state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _load(path, dtype=jnp.float32):
    cfg = ModelConfig.from_pretrained(path)
    return _flat(load_params(path, cfg, dtype)[1])


def test_sharded_equals_single(llama_dir, tmp_path):
    sharded, _ = make_checkpoint("llama-gqa", tmp_path / "sharded", max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single, multi = _load(llama_dir), _load(sharded)
    assert single.keys() == multi.keys()
    for name in single:
        np.testing.assert_array_equal(single[name], multi[name], err_msg=name)


def test_bf16_and_fp16_checkpoints_load(tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        path, model = make_checkpoint("qwen2-tied", tmp_path / str(dtype), dtype=dtype)
        params = _load(path)
        expected = model.model.embed_tokens.weight.detach().to(dtype).float().numpy()
        np.testing.assert_array_equal(params["['embed']['embedding']"], expected)


def test_resolve_dtype():
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 8,
            "hidden_size": 8,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "dtype": "float32",
        }
    )
    assert resolve_dtype("auto", cfg, platform="cpu") == jnp.float32
    assert resolve_dtype("auto", cfg, platform="gpu") == jnp.bfloat16
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    assert resolve_dtype("auto", bf16, platform="cpu", native_bf16=True) == jnp.bfloat16
    assert resolve_dtype("auto", bf16, platform="cpu", native_bf16=False) == jnp.float32  # emulated bf16
    assert resolve_dtype("auto", dataclasses.replace(cfg, dtype="float16"), platform="cpu", native_bf16=True) == (
        jnp.float32
    )
    assert resolve_dtype("auto", bf16, platform="tpu") == jnp.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", cfg)


def test_cpu_bf16_detection(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 fma\n")
    assert cpu_has_native_bf16(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f fma\nbugs\t\t: avx512_bf16\n")
    assert not cpu_has_native_bf16(str(cpuinfo))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_unexpected_and_misshaped_tensors(llama_dir, tmp_path):
    cfg = ModelConfig.from_pretrained(llama_dir)
    tensors = load_file(llama_dir / "model.safetensors")

    missing = _copy(llama_dir, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, missing / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_params(missing, cfg, jnp.float32)

    extra = _copy(llama_dir, tmp_path / "extra")
    save_file({**tensors, "model.layers.0.mystery.weight": torch.zeros(3)}, extra / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.mystery\.weight"):
        load_params(extra, cfg, jnp.float32)

    bad = _copy(llama_dir, tmp_path / "bad")
    save_file({**tensors, "model.norm.weight": torch.zeros(7)}, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight \(7,\) has the wrong shape"):
        load_params(bad, cfg, jnp.float32)


def test_unsupported_architecture_is_a_clear_error(llama_dir, tmp_path):
    other = _copy(llama_dir, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"architectures: 'GPT2LMHeadModel' is not supported; supported: Llama") as e:
        ModelConfig.from_pretrained(other)
    for family in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3"):
        assert family in str(e.value)


def test_orbax_round_trip_gives_identical_logits(llama_dir, tmp_path):
    from jserve import LLM, SamplingParams

    out_dir = tmp_path / "orbax"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "convert_checkpoint.py"),
            str(llama_dir),
            str(out_dir),
            "--dtype",
            "float32",
        ],
        check=True,
        cwd=ROOT,
    )
    assert (out_dir / "jserve_checkpoint.json").is_file()
    assert _load(llama_dir).keys() == _load(out_dir).keys()
    for a, b in zip(_load(llama_dir).values(), _load(out_dir).values(), strict=True):
        np.testing.assert_array_equal(a, b)

    prompt = [[5, 9, 33, 101, 7, 250, 3]]
    params = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=5, logprobs=5, ignore_eos=True)
    kwargs = dict(dtype="float32", max_model_len=64, num_pages=16, max_num_seqs=2, page_size=8, precompile=False)
    hf = LLM(model=llama_dir, **kwargs).generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)
    ob = LLM(model=out_dir, **kwargs).generate(prompt_token_ids=prompt, sampling_params=params, use_tqdm=False)
    assert hf[0].prompt_logprobs == ob[0].prompt_logprobs
    assert hf[0].outputs[0].logprobs == ob[0].outputs[0].logprobs
    assert hf[0].outputs[0].token_ids == ob[0].outputs[0].token_ids
