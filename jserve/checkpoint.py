"""Checkpoints: Hugging Face safetensors -> model params, and Orbax save/restore of converted params.

HF tensors are read one at a time (``safe_open``), transformed to our layout (e.g. q_proj [N*H, D] -> [D, N, H]),
cast, and placed straight onto their target sharding, so host memory holds about one tensor at a time.
Missing, unexpected or mis-shaped tensors are reported together in one clear error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from tqdm.auto import tqdm

from jserve.config import ModelConfig
from jserve.models.llama import CausalLM

ORBAX_MARKER = "jserve_checkpoint.json"
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_PROGRESS_BYTES = 256 * 1024 * 1024  # show a progress bar above this checkpoint size


@dataclass(frozen=True)
class TensorSpec:
    """How one of our params is made from HF tensors: their names, and a numpy transform."""

    hf_names: tuple[str, ...]
    transform: Callable[..., np.ndarray]


def _t(x: np.ndarray) -> np.ndarray:
    return x.T


def _param_specs(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Our flat param path ("layers/0/attn/q_proj") -> how to build it from the HF checkpoint."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    specs: dict[str, TensorSpec] = {
        "embed/embedding": TensorSpec(("model.embed_tokens.weight",), lambda w: w),
        "final_norm/weight": TensorSpec(("model.norm.weight",), lambda w: w),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = TensorSpec(("lm_head.weight",), _t)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers/{i}/"
        specs[ours + "input_norm/weight"] = TensorSpec((hf + "input_layernorm.weight",), lambda w: w)
        specs[ours + "post_attn_norm/weight"] = TensorSpec((hf + "post_attention_layernorm.weight",), lambda w: w)
        a = hf + "self_attn."
        specs[ours + "attn/q_proj"] = TensorSpec((a + "q_proj.weight",), lambda w: w.T.reshape(d, n, h))
        specs[ours + "attn/k_proj"] = TensorSpec((a + "k_proj.weight",), lambda w: w.T.reshape(d, k, h))
        specs[ours + "attn/v_proj"] = TensorSpec((a + "v_proj.weight",), lambda w: w.T.reshape(d, k, h))
        specs[ours + "attn/o_proj"] = TensorSpec((a + "o_proj.weight",), lambda w: w.T.reshape(n, h, d))
        if cfg.attention_bias:
            specs[ours + "attn/q_bias"] = TensorSpec((a + "q_proj.bias",), lambda b: b.reshape(n, h))
            specs[ours + "attn/k_bias"] = TensorSpec((a + "k_proj.bias",), lambda b: b.reshape(k, h))
            specs[ours + "attn/v_bias"] = TensorSpec((a + "v_proj.bias",), lambda b: b.reshape(k, h))
        if cfg.o_bias:
            specs[ours + "attn/o_bias_param"] = TensorSpec((a + "o_proj.bias",), lambda b: b)
        if cfg.is_moe:
            moe, e = hf + "block_sparse_moe.", range(cfg.num_experts)
            stack = lambda *ws: np.stack([w.T for w in ws])  # noqa: E731
            specs[ours + "mlp/router"] = TensorSpec((moe + "gate.weight",), _t)
            for ours_name, hf_name in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                names = tuple(f"{moe}experts.{j}.{hf_name}.weight" for j in e)
                specs[ours + "mlp/" + ours_name] = TensorSpec(names, stack)
        else:
            m = hf + "mlp."
            for name in ("gate_proj", "up_proj", "down_proj"):
                specs[ours + f"mlp/{name}"] = TensorSpec((m + name + ".weight",), _t)
                if cfg.mlp_bias:
                    short = name.split("_")[0]
                    specs[ours + f"mlp/{short}_bias"] = TensorSpec((m + name + ".bias",), lambda b: b)
    return specs


def _safetensors_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the single/all *.safetensors files."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / fname for name, fname in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {str(path)!r}")
    names: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            names.update({name: file for name in f.keys()})
    return names


class _TensorReader:
    """Opens each safetensors file once and reads tensors (or slices) on demand as numpy."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._handles: dict[Path, object] = {}

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt" if _needs_torch(file) else "np")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        tensor = self._handle(name).get_tensor(name)
        if not isinstance(tensor, np.ndarray):  # torch tensor (bf16 files): go through float32
            tensor = tensor.float().numpy()
        return tensor


def _needs_torch(file: Path) -> bool:
    """numpy cannot read bf16 safetensors; detect it from the header instead of guessing."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    return any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


def checkpoint_dtype(cfg: ModelConfig) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(cfg.dtype, "float32")


def resolve_dtype(dtype: str, cfg: ModelConfig, platform: str | None = None) -> jnp.dtype:
    """"auto": the checkpoint's dtype; float32 checkpoints run in bf16 on accelerators, fp16 in fp32 on CPU."""
    if dtype not in ("auto", "bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be one of 'auto', 'bfloat16', 'float32', 'float16', got {dtype!r}")
    if dtype != "auto":
        return jnp.dtype(dtype)
    platform = platform or jax.devices()[0].platform
    ckpt = checkpoint_dtype(cfg)
    if platform == "cpu":
        return jnp.dtype("float32" if ckpt == "float16" else ckpt)
    return jnp.dtype("bfloat16" if ckpt == "float32" else ckpt)


def abstract_model(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """Model structure and param shapes without allocating anything."""
    model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def _flatten(pure: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in pure.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, path + "/")
        else:
            yield path, value


def _set_path(pure: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    node = pure
    for key in parents:
        node = node[int(key) if int_key(node, key) else key]
    node[int(leaf) if int_key(node, leaf) else leaf] = value


def int_key(node: dict, key: str) -> bool:
    return key.isdigit() and int(key) in node


def load_hf_params(
    path: str | os.PathLike,
    cfg: ModelConfig,
    dtype,
    shardings: dict[str, jax.sharding.Sharding] | None = None,
    use_tqdm: bool | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Reads a HF checkpoint dir into (graphdef, state); ``shardings`` maps flat param paths to target shardings."""
    path = Path(path)
    files = _safetensors_files(path)
    reader = _TensorReader(files)
    graphdef, abstract_state = abstract_model(cfg, dtype)
    pure = nnx.to_pure_dict(abstract_state)
    expected = dict(_flatten(pure))
    specs = _param_specs(cfg)

    needed = {name for spec in specs.values() for name in spec.hf_names}
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(needed - files.keys())
    unexpected = sorted(n for n in files.keys() - needed - optional if not _IGNORED.match(n))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_preview(unexpected)}")
        raise ValueError(f"model: checkpoint {str(path)!r} does not match {cfg.architecture}: " + "; ".join(parts))
    assert set(specs) == set(expected), sorted(set(specs) ^ set(expected))

    total_bytes = sum(f.stat().st_size for f in set(files.values()))
    show = total_bytes > _PROGRESS_BYTES if use_tqdm is None else use_tqdm
    for our_path, spec in tqdm(specs.items(), desc="Loading weights", disable=not show, unit="tensor"):
        value = spec.transform(*(reader.read(name) for name in spec.hf_names))
        target = expected[our_path]
        if tuple(value.shape) != tuple(target.shape):
            shapes = ", ".join(f"{n} {reader.shape(n)}" for n in spec.hf_names)
            raise ValueError(
                f"model: tensor {shapes} has the wrong shape for {cfg.architecture} with this config.json "
                f"(expected {tuple(target.shape)} after conversion, got {tuple(value.shape)})"
            )
        array = jnp.asarray(value, dtype=target.dtype)
        if shardings is not None:
            array = jax.device_put(array, shardings[our_path])
        _set_path(pure, our_path, array)
    nnx.replace_by_pure_dict(abstract_state, pure)
    return graphdef, abstract_state


def _preview(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------- Orbax

_COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json",
)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / ORBAX_MARKER).is_file()


def save_orbax(state: nnx.State, cfg_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype) -> None:
    """Writes converted params with Orbax, plus config and tokenizer files so the dir is self-contained."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", nnx.to_pure_dict(state), force=True)
    for name in _COPIED_FILES:
        src = Path(cfg_dir) / name
        if src.is_file():
            shutil.copy(src, out / name)
    (out / ORBAX_MARKER).write_text(json.dumps({"format": "jserve-orbax-v1", "dtype": jnp.dtype(dtype).name}))


def load_orbax(
    path: str | os.PathLike, cfg: ModelConfig, dtype, shardings: dict[str, jax.sharding.Sharding] | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    import orbax.checkpoint as ocp

    graphdef, abstract_state = abstract_model(cfg, dtype)
    target = nnx.to_pure_dict(abstract_state)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for flat_path, leaf in list(_flatten(target)):
        sharding = shardings[flat_path] if shardings else default
        _set_path(target, flat_path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(Path(path).absolute() / "params", target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return graphdef, abstract_state


def load_params(
    path: str | os.PathLike, cfg: ModelConfig, dtype, shardings=None, use_tqdm: bool | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """HF or Orbax directory -> (graphdef, state)."""
    if is_orbax_checkpoint(path):
        return load_orbax(path, cfg, dtype, shardings)
    return load_hf_params(path, cfg, dtype, shardings, use_tqdm)
