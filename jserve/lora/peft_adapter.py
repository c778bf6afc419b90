"""A PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) read into the slot layout of
``jserve.lora.targets``, on the host, with every reason to refuse it named.

PEFT stores ``lora_A`` [r, in] and ``lora_B`` [out, r] per adapted module and applies
``base(x) + (x @ A.T @ B.T) * scale`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``). Here A becomes [*in_dims, R] and B, scale folded in, [R, *out_dims], zero-padded to
``max_lora_rank`` R. Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` split like their base weights: the
shared A goes to each part, B's rows are divided among them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jserve.checkpoint import read_safetensors
from jserve.config import ModelConfig
from jserve.lora.request import LoRARequest
from jserve.lora.targets import ALL_TARGETS, MLP_TARGETS, LoRASpec, target_dims

_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_REFUSED_OPTIONS = {
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D base layers) are not supported",
    "lora_bias": "adapters with a bias on lora_B (lora_bias) are not supported",
    "layer_replication": "layer_replication (layers repeated beyond the base model's) is not supported",
}


@dataclass
class HostAdapter:
    """An adapter's weights in host memory: target -> (A [layers, *in, R], B [layers, R, *out])."""

    request: LoRARequest
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def slot_values(self, layers: range, targets: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        """One slot's contents for a stage: per target, A [L, *in, 1, R] and B [L, 1, R, *out]."""
        values = []
        for target in targets:
            a, b = self.weights[target]
            values += [a[layers.start : layers.stop, ..., None, :], b[layers.start : layers.stop, None]]
        return tuple(values)


def load_peft_adapter(request: LoRARequest, cfg: ModelConfig, spec: LoRASpec, dtype) -> HostAdapter:
    """Reads and checks ``request.lora_path``; ValueError naming the adapter and the reason."""
    try:
        return _load(request, cfg, spec, np.dtype(dtype))
    except ValueError as e:
        raise ValueError(f"lora adapter {request.lora_name!r} ({request.lora_path}): {e}") from None


def _load(request: LoRARequest, cfg: ModelConfig, spec: LoRASpec, dtype: np.dtype) -> HostAdapter:
    path = Path(request.lora_path)
    config = _read_config(path)
    tensors = _read_tensors(path)
    grouped: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        match = _TENSOR.search(name)
        if match is None:
            raise ValueError(f"tensor {name!r} adapts a module jserve does not serve adapters on")
        layer, block, module, ab = int(match[1]), match[2], match[3], match[4]
        grouped.setdefault((layer, block, module), {})[ab] = value
    weights = {t: _zeros(cfg, spec, t, dtype) for t in spec.targets}
    rank = 0
    for (layer, block, module), pair in sorted(grouped.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"layers.{layer}.{block}.{module} has lora_{'A' if 'B' in pair else 'B'} missing")
        a, b = pair["A"], pair["B"]
        r = a.shape[0]
        rank = max(rank, r)
        _check_module(cfg, spec, layer, block, module, r)
        alpha = _module_alpha(config, f"model.layers.{layer}.{block}.{module}")
        scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        parts = _FUSED.get(module, (module,))
        out_sizes = [target_dims(cfg, t).out_size for t in parts]
        if a.ndim != 2 or b.ndim != 2 or b.shape != (sum(out_sizes), r):
            raise ValueError(f"layers.{layer}.{block}.{module}: lora_B {b.shape} does not fit the base model")
        rows = np.cumsum([0, *out_sizes])
        for target, start, stop in zip(parts, rows[:-1], rows[1:], strict=True):
            dims = target_dims(cfg, target)
            if a.shape[1] != dims.in_size:
                raise ValueError(f"layers.{layer}.{block}.{module}: lora_A {a.shape} does not fit the base model")
            a_ours, b_ours = weights[target]
            a_ours[layer, ..., :r] = a.astype(np.float32).T.reshape(*dims.in_dims, r)
            b_part = b[start:stop].astype(np.float32) * scale
            b_ours[layer, :r] = b_part.T.reshape(r, *dims.out_dims)
    if not grouped:
        raise ValueError("adapter_model.safetensors holds no LoRA weights")
    return HostAdapter(request, weights, rank)


def _read_config(path: Path) -> dict:
    file = path / "adapter_config.json"
    if not file.is_file():
        raise ValueError("not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"adapter_config.json is not readable JSON: {e}") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("modules_to_save"):
        raise ValueError(
            f"modules_to_save {config['modules_to_save']} is not supported: the adapter replaces whole modules "
            "(train it without modules_to_save, or merge it into the base model)"
        )
    for option, reason in _REFUSED_OPTIONS.items():
        if config.get(option):
            raise ValueError(reason)
    if config.get("bias", "none") != "none":
        raise ValueError(f"bias={config['bias']!r} adapters are not supported (only bias='none')")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise ValueError("adapter_config.json has no numeric lora_alpha")
    return config


def _module_alpha(config: dict, module_path: str) -> float:
    """``lora_alpha``, or the ``alpha_pattern`` entry matching the module (peft's rule: a key matches a module
    whose dotted path ends with it; ranks need no such lookup, they are the tensors' own)."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{key}$", module_path):
            return float(alpha)
    return float(config["lora_alpha"])


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        if (path / "adapter_model.bin").exists():
            raise ValueError("adapter_model.bin is not read: save the adapter with safe_serialization=True")
        raise ValueError("no adapter_model.safetensors")
    try:
        return read_safetensors(file)
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error types
        raise ValueError(f"adapter_model.safetensors is not readable: {e}") from None


def _check_module(cfg: ModelConfig, spec: LoRASpec, layer: int, block: str, module: str, rank: int) -> None:
    where = f"layers.{layer}.{block}.{module}"
    if layer >= cfg.num_layers:
        raise ValueError(f"{where}: the base model has {cfg.num_layers} layers")
    fused = module in _FUSED
    if module not in ALL_TARGETS and not fused:
        raise ValueError(f"{where}: jserve serves adapters on {list(ALL_TARGETS)} (and Phi-3's fused ones) only")
    if fused != cfg.fused_projections and module not in ("o_proj", "down_proj"):
        raise ValueError(f"{where}: the base model has no module {module!r}")
    parts = _FUSED.get(module, (module,))
    if any(p in MLP_TARGETS for p in parts) and cfg.is_moe_layer(layer):
        raise ValueError(f"{where}: layer {layer} is a mixture of experts, whose experts take no adapters")
    expected_block = "mlp" if parts[0] in MLP_TARGETS else "self_attn"
    if block != expected_block:
        raise ValueError(f"{where}: the base model has no module {block}.{module}")
    if rank > spec.max_lora_rank:
        raise ValueError(f"rank {rank} of {where} exceeds max_lora_rank={spec.max_lora_rank}")
    missing = [p for p in parts if p not in spec.targets]
    if missing:
        raise ValueError(
            f"{where}: this engine serves adapters on {list(spec.targets)} only (lora_target_modules), not {missing}"
        )


def _zeros(cfg: ModelConfig, spec: LoRASpec, target: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros(spec.a_shape(cfg, target, cfg.num_layers)[:-2] + (spec.max_lora_rank,), dtype)
    b = np.zeros((cfg.num_layers, spec.max_lora_rank) + target_dims(cfg, target).out_dims, dtype)
    return a, b
