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
from jserve.quant import compressed_tensors
from jserve.quant.weights import pack_int4, quantize

ORBAX_MARKER = "jserve_checkpoint.json"
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_PROGRESS_BYTES = 256 * 1024 * 1024  # show a progress bar above this checkpoint size


Index = tuple[slice, ...]


def _flat_range(dims: tuple[int, ...], index: Index) -> slice:
    """A group of our dims that is one flattened HF axis -> the HF range. Only the group's first dim may be split
    (sharding splits heads / mlp / vocab / hidden, each the leading dim of its group)."""
    if not dims:
        return slice(None)
    inner = int(np.prod(dims[1:], dtype=np.int64))
    first = index[0].indices(dims[0])
    for sl, size in zip(index[1:], dims[1:], strict=True):
        assert sl.indices(size) == (0, size, 1), "only the leading dim of a group can be sharded"
    return slice(first[0] * inner, first[1] * inner)


@dataclass(frozen=True)
class TensorSpec:
    """One of our params read from one HF tensor: ``ours = hf.T.reshape(b_dims + a_dims)`` when transposed
    (HF [A, B] as [out, in]), else ``ours = hf.reshape(a_dims)``. Knowing the layout lets a device read only the
    rows/columns of its own shard (``safetensors`` slices), so loading never holds a whole tensor per device."""

    hf_name: str
    a_dims: tuple[int, ...]
    b_dims: tuple[int, ...] = ()
    transposed: bool = False
    hf_flat: bool = False  # untransposed, but stored flattened in HF (q/k/v biases [N*H] -> ours [N, H])
    row_offset: int = 0  # transposed: where our rows start in a fused HF tensor (Phi-3's qkv_proj, gate_up_proj)
    fused_rows: int | None = None  # that fused tensor's row count (what its shape is checked against)

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf_name,)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.b_dims + self.a_dims if self.transposed else self.a_dims

    def read(self, reader: _TensorReader, index: Index) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        if not self.transposed:
            if not self.hf_flat:
                return reader.read_slice(self.hf_name, index)
            block = reader.read_slice(self.hf_name, (_flat_range(self.a_dims, index),))
            return block.reshape(tuple(len(range(*i.indices(d))) for i, d in zip(index, self.a_dims, strict=True)))
        nb = len(self.b_dims)
        rows = _flat_range(self.a_dims, index[nb:])
        if self.row_offset or rows == slice(None):
            start, stop, _ = rows.indices(int(np.prod(self.a_dims, dtype=np.int64)))
            rows = slice(start + self.row_offset, stop + self.row_offset)
        cols = _flat_range(self.b_dims, index[:nb])
        block = reader.read_slice(self.hf_name, (rows, cols)).T
        out_shape = tuple(len(range(*i.indices(d))) for i, d in zip(index, self.shape, strict=True))
        return block.reshape(out_shape)


@dataclass(frozen=True)
class StackedSpec:
    """Mixtral experts: ours [E, ...] stacks one transposed HF tensor per expert; a shard reads its experts only."""

    experts: tuple[TensorSpec, ...]

    @property
    def hf_names(self) -> tuple[str, ...]:
        return tuple(e.hf_name for e in self.experts)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.experts), *self.experts[0].shape)

    def read(self, reader: _TensorReader, index: Index) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        chosen = range(*index[0].indices(len(self.experts)))
        return np.stack([self.experts[j].read(reader, index[1:]) for j in chosen])


def _linear(
    name: str, in_dims: tuple[int, ...], out_dims: tuple[int, ...], offset: int = 0, fused: int | None = None
) -> TensorSpec:
    """HF nn.Linear weight [out, in] -> ours [*in_dims, *out_dims]; ``offset`` / ``fused``: our rows' start in a
    fused weight of ``fused`` rows."""
    return TensorSpec(name, out_dims, in_dims, transposed=True, row_offset=offset, fused_rows=fused)


def _param_specs(cfg: ModelConfig) -> dict[str, TensorSpec | StackedSpec]:
    """Our flat param path ("layers/0/attn/q_proj") -> where and how to read it from the HF checkpoint."""
    d, v = cfg.hidden_size, cfg.vocab_size
    specs: dict[str, TensorSpec | StackedSpec] = {
        "embed/embedding": TensorSpec("model.embed_tokens.weight", (v, d)),
        "final_norm/weight": TensorSpec("model.norm.weight", (d,)),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = _linear("lm_head.weight", (d,), (v,))
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers/{i}/"
        for part in (_norm_specs(cfg, hf), _attention_specs(cfg, hf + "self_attn."), _mlp_specs(cfg, i, hf)):
            specs.update({ours + name: spec for name, spec in part.items()})
    return specs


def _norm_specs(cfg: ModelConfig, hf: str) -> dict[str, TensorSpec]:
    """A decoder layer's norms (``hf``: the layer's HF prefix)."""
    d = cfg.hidden_size
    specs = {"input_norm/weight": TensorSpec(hf + "input_layernorm.weight", (d,))}
    if cfg.sandwich_norms:  # Gemma 2/3: HF's post_attention_layernorm normalises the attention output
        specs["attn_out_norm/weight"] = TensorSpec(hf + "post_attention_layernorm.weight", (d,))
        specs["post_attn_norm/weight"] = TensorSpec(hf + "pre_feedforward_layernorm.weight", (d,))
        specs["mlp_out_norm/weight"] = TensorSpec(hf + "post_feedforward_layernorm.weight", (d,))
    else:
        specs["post_attn_norm/weight"] = TensorSpec(hf + "post_attention_layernorm.weight", (d,))
    return specs


def _attention_specs(cfg: ModelConfig, a: str) -> dict[str, TensorSpec]:
    """A layer's attention projections, norms and biases (``a``: HF's "model.layers.i.self_attn.")."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    specs: dict[str, TensorSpec] = {}
    if cfg.fused_projections:  # Phi-3: one qkv_proj [(N + 2K) * H, D], split on load
        qkv, rows = a + "qkv_proj.weight", (n + 2 * k) * h
        specs["attn/q_proj"] = _linear(qkv, (d,), (n, h), 0, rows)
        specs["attn/k_proj"] = _linear(qkv, (d,), (k, h), n * h, rows)
        specs["attn/v_proj"] = _linear(qkv, (d,), (k, h), (n + k) * h, rows)
    else:
        specs["attn/q_proj"] = _linear(a + "q_proj.weight", (d,), (n, h))
        specs["attn/k_proj"] = _linear(a + "k_proj.weight", (d,), (k, h))
        specs["attn/v_proj"] = _linear(a + "v_proj.weight", (d,), (k, h))
    specs["attn/o_proj"] = _linear(a + "o_proj.weight", (n, h), (d,))
    if cfg.qk_norm:
        specs["attn/q_norm/weight"] = TensorSpec(a + "q_norm.weight", (h,))
        specs["attn/k_norm/weight"] = TensorSpec(a + "k_norm.weight", (h,))
    if cfg.attention_bias:
        specs["attn/q_bias"] = TensorSpec(a + "q_proj.bias", (n, h), hf_flat=True)
        specs["attn/k_bias"] = TensorSpec(a + "k_proj.bias", (k, h), hf_flat=True)
        specs["attn/v_bias"] = TensorSpec(a + "v_proj.bias", (k, h), hf_flat=True)
    if cfg.o_bias:
        specs["attn/o_bias_param"] = TensorSpec(a + "o_proj.bias", (d,))
    return specs


def _mlp_specs(cfg: ModelConfig, i: int, hf: str) -> dict[str, TensorSpec | StackedSpec]:
    """Layer ``i``'s MLP: a mixture of experts, Phi-3's fused gate/up, or three projections (and biases)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    if cfg.is_moe_layer(i):
        # Mixtral: block_sparse_moe.experts.j.w1 / w3 / w2; Qwen3-MoE: mlp.experts.j.gate / up / down_proj
        mixtral = cfg.architecture == "MixtralForCausalLM"
        moe = hf + ("block_sparse_moe." if mixtral else "mlp.")
        specs: dict[str, TensorSpec | StackedSpec] = {
            "mlp/router": _linear(moe + "gate.weight", (d,), (cfg.num_experts,))
        }
        fe = cfg.expert_size
        for ours_name, hf_name, in_dim, out_dim in (
            ("gate_proj", "w1" if mixtral else "gate_proj", d, fe),
            ("up_proj", "w3" if mixtral else "up_proj", d, fe),
            ("down_proj", "w2" if mixtral else "down_proj", fe, d),
        ):
            specs["mlp/" + ours_name] = StackedSpec(
                tuple(
                    _linear(f"{moe}experts.{j}.{hf_name}.weight", (in_dim,), (out_dim,)) for j in range(cfg.num_experts)
                )
            )
        return specs
    m = hf + "mlp."
    if cfg.fused_projections:  # Phi-3: gate_up_proj [2F, D], gate first
        return {
            "mlp/gate_proj": _linear(m + "gate_up_proj.weight", (d,), (f,), 0, 2 * f),
            "mlp/up_proj": _linear(m + "gate_up_proj.weight", (d,), (f,), f, 2 * f),
            "mlp/down_proj": _linear(m + "down_proj.weight", (f,), (d,)),
        }
    specs = {
        "mlp/gate_proj": _linear(m + "gate_proj.weight", (d,), (f,)),
        "mlp/up_proj": _linear(m + "up_proj.weight", (d,), (f,)),
        "mlp/down_proj": _linear(m + "down_proj.weight", (f,), (d,)),
    }
    if cfg.mlp_bias:
        specs["mlp/gate_bias"] = TensorSpec(m + "gate_proj.bias", (f,))
        specs["mlp/up_bias"] = TensorSpec(m + "up_proj.bias", (f,))
        specs["mlp/down_bias"] = TensorSpec(m + "down_proj.bias", (d,))
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
        self._headers: dict[Path, tuple[dict, int]] = {}

    def _header(self, file: Path) -> tuple[dict, int]:
        if file not in self._headers:
            self._headers[file] = _header(file)
        return self._headers[file]

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="flax" if _needs_jax(self._header(file)[0]) else "np")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read_full(self, name: str) -> np.ndarray:
        """A whole tensor. safetensors cannot return fp8 (it asks numpy for a float8 type, which lives in
        ml_dtypes), so fp8 tensors are read from the file's byte range directly."""
        header, data_start = self._header(self.files[name])
        entry = header[name]
        if entry["dtype"] == "F8_E4M3":
            begin, end = entry["data_offsets"]
            raw = np.fromfile(self.files[name], dtype=np.uint8, count=end - begin, offset=data_start + begin)
            return raw.view(jnp.float8_e4m3fn).reshape(entry["shape"])
        return np.asarray(self._handle(name).get_tensor(name))

    def read_slice(self, name: str, index: Index) -> np.ndarray:
        """Only the requested rows/columns are read from disk."""
        part = self._handle(name).get_slice(name)[index]
        return np.asarray(part)  # bf16 files come as jax arrays: numpy (ml_dtypes bfloat16), no copy to convert


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy (bf16 and fp8 included), e.g. a PEFT adapter's."""
    names = [name for name in _header(file)[0] if name != "__metadata__"]
    reader = _TensorReader(dict.fromkeys(names, file))
    return {name: reader.read_full(name) for name in names}


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where tensor data starts."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(header_len)), 8 + header_len


def _needs_jax(header: dict) -> bool:
    """safetensors' numpy reader refuses bf16 (its jax reader takes it, without importing torch); detect it
    from the header instead of guessing."""
    return any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


def checkpoint_dtype(cfg: ModelConfig) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(cfg.dtype, "float32")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags; False
    where the file is missing)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, cfg: ModelConfig, platform: str | None = None, native_bf16: bool | None = None):
    """ "auto": the checkpoint's dtype on accelerators (float32 checkpoints run in bf16 there). On CPU a bf16
    checkpoint runs in bf16 where the CPU multiplies bf16 natively (``native_bf16``, default: detected), which
    measured as fast as float32 at batch 1 and 1.3-1.8x faster from batch 8 up on AVX512-BF16 (docs/benchmarks.md),
    and everything else in float32 (XLA:CPU's float16 path is unmeasured and older CPUs emulate bf16)."""
    if dtype not in ("auto", "bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be one of 'auto', 'bfloat16', 'float32', 'float16', got {dtype!r}")
    if dtype != "auto":
        return jnp.dtype(dtype)
    platform = platform or jax.devices()[0].platform
    ckpt = checkpoint_dtype(cfg)
    if platform == "cpu":
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return jnp.dtype("bfloat16" if ckpt == "bfloat16" and native else "float32")
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


Shardings = dict[str, jax.sharding.Sharding] | Callable[[nnx.State], dict[str, jax.sharding.Sharding]] | None


def _resolved(shardings: Shardings, abstract_state: nnx.State) -> dict[str, jax.sharding.Sharding] | None:
    """``shardings`` as a dict: a callable gets the abstract state the loader built anyway (building it costs
    ~0.09 s for the bundled model, ~0.4 s at 32 layers; a caller deriving shardings need not build another)."""
    return shardings(abstract_state) if callable(shardings) else shardings


def load_hf_params(
    path: str | os.PathLike,
    cfg: ModelConfig,
    dtype,
    shardings: Shardings = None,
    use_tqdm: bool | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Reads a HF checkpoint dir into (graphdef, state); ``shardings`` maps flat param paths to target shardings
    (or is a function of the abstract state that returns that map)."""
    path = Path(path)
    files = _safetensors_files(path)
    reader = _TensorReader(files)
    graphdef, abstract_state = abstract_model(cfg, dtype)
    shardings = _resolved(shardings, abstract_state)
    pure = nnx.to_pure_dict(abstract_state)
    expected = dict(_flatten(pure))
    specs = _param_specs(cfg)

    fmt = cfg.checkpoint_quant_format
    quantized = {p for p in specs if p + "/values" in expected}
    needed = {name for p, spec in specs.items() for name in _hf_tensor_names(spec, fmt if p in quantized else None)}
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
    leaves = {p + s for p in specs for s in (("/values", "/scale") if p in quantized else ("",))}
    assert leaves == set(expected), sorted(leaves ^ set(expected))

    total_bytes = sum(f.stat().st_size for f in set(files.values()))
    show = total_bytes > _PROGRESS_BYTES if use_tqdm is None else use_tqdm
    for our_path, spec in tqdm(specs.items(), desc="Loading weights", disable=not show, unit="tensor"):
        if our_path in quantized:
            values_path, scale_path = our_path + "/values", our_path + "/scale"
            values, scale = _read_quantized(reader, spec, cfg, tuple(expected[scale_path].shape))
            assert values.shape == tuple(expected[values_path].shape), (values.shape, expected[values_path].shape)
            for leaf_path, host in ((values_path, values), (scale_path, scale)):
                placed = _place_host(host, expected[leaf_path].dtype, shardings and shardings[leaf_path])
                _set_path(pure, leaf_path, placed)
            continue
        target = expected[our_path]
        _check_shape(reader, spec, tuple(target.shape), cfg)
        dtype = target.dtype

        def read(index: Index, spec=spec, dtype=dtype) -> np.ndarray:
            return np.asarray(spec.read(reader, index), dtype=dtype)

        if shardings is None:
            array = jnp.asarray(read(()))
        else:
            array = _place_shard_by_shard(tuple(target.shape), shardings[our_path], read)
        _set_path(pure, our_path, array)
    nnx.replace_by_pure_dict(abstract_state, pure)
    return graphdef, abstract_state


def _place_host(host: np.ndarray, dtype, sharding: jax.sharding.Sharding | None) -> jax.Array:
    host = np.asarray(host, dtype=dtype)
    if sharding is None:
        return jnp.asarray(host)
    return _place_shard_by_shard(host.shape, sharding, lambda index: host[index])


def _hf_tensor_names(spec, fmt: str | None) -> tuple[str, ...]:
    """The checkpoint tensors a param reads: its dense weights, or a compressed-tensors linear's parts."""
    if fmt is None:
        return spec.hf_names
    return tuple(n for name in spec.hf_names for n in compressed_tensors.tensor_names(_linear_prefix(name), fmt))


def _linear_prefix(hf_weight_name: str) -> str:
    """ "model.layers.0.self_attn.q_proj.weight" -> "model.layers.0.self_attn.q_proj." (its parts' prefix)."""
    return hf_weight_name[: -len("weight")]


def _read_quantized(reader: _TensorReader, spec, cfg: ModelConfig, scale_shape):
    """A quantized linear as stored on the device: (values, scale) numpy in our layout (int4 packed in pairs),
    from a compressed-tensors checkpoint or by quantizing the dense weight on the host (whole tensor: a
    per-channel scale spans every input row)."""
    values, scale = _read_quantized_values(reader, spec, cfg, scale_shape)
    return (pack_int4(values) if cfg.weight_quant.method == "int4" else values), scale


def _read_quantized_values(reader: _TensorReader, spec, cfg: ModelConfig, scale_shape):
    quant = cfg.weight_quant
    if cfg.checkpoint_quant_format is None:
        _check_shape(reader, spec, spec.shape, cfg)
        return quantize(np.asarray(spec.read(reader, ()), np.float32), scale_shape, quant.storage_dtype)
    stacked = isinstance(spec, StackedSpec)
    parts = spec.experts if stacked else (spec,)
    values, scales = [], []
    for part, hf_shape in zip(parts, _hf_shapes(spec), strict=True):
        v, sc = compressed_tensors.read_linear(
            reader.read_full, _linear_prefix(part.hf_name), cfg.checkpoint_quant_format, quant
        )
        if v.shape != hf_shape:
            raise _wrong_shape(part.hf_name, v.shape, hf_shape, cfg)
        values.append(v.T.reshape(part.shape))  # HF [out, in] -> ours [*in, *out], as for dense weights
        scales.append(sc.T.reshape(scale_shape[1:] if stacked else scale_shape))
    if stacked:
        return np.stack(values), np.stack(scales)
    return values[0], scales[0]


def _place_shard_by_shard(shape: tuple[int, ...], sharding: jax.sharding.Sharding, read) -> jax.Array:
    """Each device reads and receives only its own slice, one device at a time.

    NOTE: ``jax.make_array_from_callback`` would first collect every device's numpy slice (a whole tensor on the
    host for a fully sharded param); copying each slice to its device before reading the next keeps the host
    peak near one shard.
    """
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        pieces.append(jax.device_put(read(index), device))
        pieces[-1].block_until_ready()
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def _check_shape(reader: _TensorReader, spec, expected: tuple[int, ...], cfg: ModelConfig) -> None:
    for name, part_shape in zip(spec.hf_names, _hf_shapes(spec), strict=True):
        actual = reader.shape(name)
        if actual != part_shape:
            raise _wrong_shape(name, actual, part_shape, cfg)
    assert spec.shape == expected, (spec.shape, expected)


def _wrong_shape(name: str, actual, expected, cfg: ModelConfig) -> ValueError:
    return ValueError(
        f"model: tensor {name} {tuple(actual)} has the wrong shape for {cfg.architecture} with this config.json "
        f"(expected {tuple(expected)})"
    )


def _hf_shapes(spec) -> list[tuple[int, ...]]:
    parts = spec.experts if isinstance(spec, StackedSpec) else (spec,)
    out = []
    for p in parts:
        a = p.fused_rows or int(np.prod(p.a_dims, dtype=np.int64))
        if p.transposed:
            out.append((a, int(np.prod(p.b_dims, dtype=np.int64))))
        else:
            out.append((a,) if p.hf_flat else p.a_dims)
    return out


def _preview(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------- Orbax

_COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
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
    path: str | os.PathLike,
    cfg: ModelConfig,
    dtype,
    shardings: Shardings = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    import orbax.checkpoint as ocp

    graphdef, abstract_state = abstract_model(cfg, dtype)
    shardings = _resolved(shardings, abstract_state)
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
    path: str | os.PathLike, cfg: ModelConfig, dtype, shardings: Shardings = None, use_tqdm: bool | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """HF or Orbax directory -> (graphdef, state)."""
    if is_orbax_checkpoint(path):
        return load_orbax(path, cfg, dtype, shardings)
    return load_hf_params(path, cfg, dtype, shardings, use_tqdm)
