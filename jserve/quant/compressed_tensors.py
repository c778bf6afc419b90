"""compressed-tensors checkpoints (llm-compressor, vLLM, the ``-FP8-dynamic`` / ``-quantized.w4a16`` models).

Supported: ``pack-quantized`` symmetric int4 / int8 weights with channel or group scales (``weight_packed`` int32
words, ``weight_scale`` [out, in / group], ``weight_shape``) and ``float-quantized`` e4m3 weights with channel
or tensor scales (``weight`` float8, ``weight_scale`` [out, 1]), activations either unquantized or the
FP8_DYNAMIC per-token fp8 scheme. Anything else raises ``ValueError`` naming what is unsupported; a quantized
checkpoint is never loaded as dense. No jax import here (``ModelConfig`` parses the config).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jserve.quant.config import WeightQuant

FORMATS = ("pack-quantized", "float-quantized")
# Layer-0 names of the linears jserve quantizes: an ``ignore`` entry that matches one would leave it dense.
_QUANTIZED_LINEARS = tuple(
    f"model.layers.0.{name}"
    for name in (
        *(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *(f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")),
        *(f"block_sparse_moe.experts.0.{w}" for w in ("w1", "w2", "w3")),
    )
)


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"quantization_config: {what} is not supported (jserve reads compressed-tensors "
        f"{' / '.join(FORMATS)}: symmetric int4/int8 or fp8 weights, channel or group scales)"
    )


def parse_quantization_config(qc: dict[str, Any]) -> tuple[WeightQuant, str]:
    """config.json's ``quantization_config`` -> (the scheme, the storage format)."""
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise _unsupported(f"quant_method {method!r}")
    if qc.get("sparsity_config"):
        raise _unsupported("sparsity_config")
    if qc.get("transform_config"):
        raise _unsupported("transform_config")
    dense = [entry for entry in qc.get("ignore") or [] if _leaves_a_linear_dense(entry)]
    if dense:
        raise _unsupported(f"ignore {dense} (it leaves linear layers dense; jserve quantizes all of them)")
    if qc.get("kv_cache_scheme"):
        raise _unsupported("kv_cache_scheme (use kv_cache_dtype instead)")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _unsupported(f"quantization_status {status!r} (only 'compressed' checkpoints)")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _unsupported("a quantization_config without config_groups")
    schemes = set()
    for name, group in groups.items():
        fmt = group.get("format") or qc.get("format")
        targets = group.get("targets") or []
        if targets != ["Linear"]:
            raise _unsupported(f"config_groups.{name}.targets {targets!r} (only ['Linear'])")
        if group.get("output_activations"):
            raise _unsupported(f"config_groups.{name}.output_activations")
        schemes.add(_group_scheme(name, fmt, group.get("weights") or {}, group.get("input_activations")))
    if len(schemes) != 1:
        described = sorted(f"{q.describe()} ({fmt})" for q, fmt in schemes)
        raise _unsupported(f"config_groups with different schemes ({'; '.join(described)})")
    return schemes.pop()


def _leaves_a_linear_dense(entry: str) -> bool:
    """``lm_head`` and the MoE router stay dense in jserve too; any entry matching another linear does not."""
    if entry.startswith("re:"):
        return any(re.match(entry[3:], name) for name in _QUANTIZED_LINEARS)
    return any(name.endswith("." + entry.split(".")[-1]) for name in _QUANTIZED_LINEARS)


def _group_scheme(name: str, fmt: str | None, w: dict, acts: dict | None) -> tuple[WeightQuant, str]:
    where = f"config_groups.{name}"
    if fmt not in FORMATS:
        raise _unsupported(f"{where}.format {fmt!r}")
    if not w:
        raise _unsupported(f"{where} without weights")
    if not w.get("symmetric", True):
        raise _unsupported(f"{where}.weights.symmetric=false (asymmetric zero points)")
    if w.get("dynamic"):
        raise _unsupported(f"{where}.weights.dynamic")
    if w.get("actorder"):
        raise _unsupported(f"{where}.weights.actorder {w['actorder']!r}")
    if w.get("block_structure"):
        raise _unsupported(f"{where}.weights.block_structure")
    strategy, bits, kind = w.get("strategy"), w.get("num_bits"), w.get("type")
    if fmt == "pack-quantized":
        if kind != "int" or bits not in (4, 8):
            raise _unsupported(f"{where}.weights {kind} with {bits} bits in pack-quantized (int 4 or 8)")
        if strategy == "channel":
            group_size = None
        elif strategy == "group" and w.get("group_size"):
            group_size = int(w["group_size"])
        else:
            raise _unsupported(f"{where}.weights.strategy {strategy!r}")
        method = "int4" if bits == 4 else "int8"
    else:
        if kind != "float" or bits != 8:
            raise _unsupported(f"{where}.weights {kind} with {bits} bits in float-quantized (float 8)")
        if strategy not in ("channel", "tensor"):
            raise _unsupported(f"{where}.weights.strategy {strategy!r}")
        group_size, method = None, "fp8"
    fp8_acts = False
    if acts:
        dynamic_fp8_tokens = (
            acts.get("type") == "float"
            and acts.get("num_bits") == 8
            and acts.get("dynamic") is True
            and acts.get("strategy") == "token"
            and acts.get("symmetric", True)
        )
        if not dynamic_fp8_tokens:
            raise _unsupported(f"{where}.input_activations {acts!r} (only dynamic per-token fp8)")
        fp8_acts = True
    return WeightQuant(method, group_size, fp8_activations=fp8_acts), fmt


def unpack_int32(packed: np.ndarray, num_bits: int, shape: tuple[int, int], name: str = "weight_packed") -> np.ndarray:
    """``weight_packed`` int32 [out, ceil(in * bits / 32)] -> int8 [out, in]: element j of a row sits at bit
    j * bits of the row's little-endian word stream, stored with an offset of 2^(bits - 1)."""
    assert num_bits in (4, 8)
    per_word = 32 // num_bits
    words = packed.astype(np.int32).view(np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * num_bits)[None, None, :]
    fields = (words[:, :, None] >> shifts) & np.uint32((1 << num_bits) - 1)
    values = fields.reshape(words.shape[0], -1)[:, : shape[1]].astype(np.int16) - (1 << (num_bits - 1))
    if values.shape != tuple(shape):
        raise ValueError(f"model: {name} {packed.shape} does not unpack to its weight_shape {tuple(shape)}")
    return values.astype(np.int8)


def tensor_names(base: str, fmt: str) -> tuple[str, ...]:
    """The checkpoint tensors of one quantized nn.Linear (``base`` = "model.layers.0.self_attn.q_proj.")."""
    if fmt == "pack-quantized":
        return (base + "weight_packed", base + "weight_scale", base + "weight_shape")
    return (base + "weight", base + "weight_scale")


def read_linear(read, base: str, fmt: str, quant: WeightQuant) -> tuple[np.ndarray, np.ndarray]:
    """One nn.Linear in HF layout -> (values [out, in] in the storage dtype, float32 scales [out, groups]).
    ``read(name)`` returns a whole checkpoint tensor as numpy."""
    scale = np.asarray(read(base + "weight_scale"), np.float32)
    if fmt == "pack-quantized":
        shape = tuple(int(x) for x in np.asarray(read(base + "weight_shape")).reshape(-1))
        bits = 4 if quant.method == "int4" else 8
        packed = np.asarray(read(base + "weight_packed"))
        values = unpack_int32(packed, bits, shape, base + "weight_packed").astype(quant.storage_dtype)
    else:
        values = np.asarray(read(base + "weight")).astype(quant.storage_dtype)
    out = values.shape[0]
    if scale.size == 1:  # tensor strategy: one scale -> the same scale for every channel
        scale = np.full((out, 1), float(scale.reshape(-1)[0]), np.float32)
    scale = scale.reshape(out, -1)
    expected_groups = 1 if quant.group_size is None else values.shape[1] // quant.group_size
    if scale.shape[1] != expected_groups:
        raise ValueError(f"model: {base}weight_scale {scale.shape} does not match {quant.describe()}")
    return values, scale
