"""Logical axes -> mesh axes. Model code names logical axes only; this table is the one place that maps them.

Megatron-style tensor parallelism falls out of the table: q/k/v and gate/up are split on their output heads/mlp
axis (column parallel), o and down on their input axis (row parallel, one all-reduce per block, inserted by XLA),
embedding and LM head on the vocabulary. Mixtral's experts are split over the same "tp" devices instead of their
mlp axis (expert parallelism). An axis that does not divide evenly — e.g. kv heads when tp > num_kv_heads — is
replicated, so each device keeps every KV head its query heads need.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve.config import ModelConfig

LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("experts", "tp"),  # first: an expert-stacked weight spends "tp" on experts, not on its mlp axis
    ("vocab", "tp"),
    ("q_heads", "tp"),
    ("kv_heads", "tp"),
    ("mlp", "tp"),
    ("embed", None),
    ("head_dim", None),
)


def _axis_size(cfg: ModelConfig, logical: str) -> int | None:
    return {
        "vocab": cfg.vocab_size,
        "q_heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "mlp": cfg.intermediate_size,
        "experts": cfg.num_experts,
    }.get(logical)


def logical_to_spec(
    axes: tuple[str | None, ...], cfg: ModelConfig, mesh: Mesh, shape: tuple[int, ...] | None = None
) -> PartitionSpec:
    """PartitionSpec for a param with these logical axes; each mesh axis used at most once, in rule order.
    ``shape``: the param's own dims, when they differ from the model's (a quantized weight's group scales)."""
    rules = dict(LOGICAL_RULES)
    priority = [name for name, _ in LOGICAL_RULES]
    assigned: dict[int, str] = {}
    used: set[str] = set()
    order = sorted(range(len(axes)), key=lambda i: priority.index(axes[i]) if axes[i] in priority else len(priority))
    for i in order:
        mesh_axis = rules.get(axes[i]) if axes[i] is not None else None
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape:
            continue
        size = shape[i] if shape is not None and len(shape) == len(axes) else _axis_size(cfg, axes[i])
        if size is not None and size % mesh.shape[mesh_axis]:
            continue  # not divisible: replicate this axis
        assigned[i] = mesh_axis
        used.add(mesh_axis)
    return PartitionSpec(*(assigned.get(i) for i in range(len(axes))))


def param_specs(state: nnx.State, cfg: ModelConfig, mesh: Mesh) -> dict[str, PartitionSpec]:
    """Flat param path ("layers/0/attn/q_proj") -> PartitionSpec, from each Param's logical axis names."""
    specs, shapes = {}, {}
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
        name = "/".join(str(p) for p in path)
        shapes[name] = tuple(var.get_value().shape)
        specs[name] = logical_to_spec(tuple(axes), cfg, mesh, shapes[name])
    _check_scale_shards(specs, shapes, cfg, mesh.shape.get("tp", 1))
    return specs


def _check_scale_shards(
    specs: dict[str, PartitionSpec], shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, mesh_size: int
) -> None:
    """A quantized weight split on an input dim needs its scale groups split the same way (no group may span two
    devices' rows)."""
    for name, spec in specs.items():
        if not name.endswith("/values"):
            continue
        scale = name[: -len("values")] + "scale"
        for i, (axis, scale_axis) in enumerate(zip(spec, specs[scale], strict=False)):
            if axis is not None and scale_axis != axis and shapes[scale][i] > 1:
                group = cfg.weight_quant.group_size if cfg.weight_quant else None
                raise ValueError(
                    f"quantization_group_size {group}: the {shapes[scale][i]} scale groups of "
                    f"{name[: -len('/values')]} do not split evenly over tensor_parallel_size={mesh_size}; "
                    "use a group size (or a checkpoint quantized with one) that divides each device's rows, "
                    "or a smaller tensor_parallel_size"
                )


def param_shardings(state: nnx.State, cfg: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    return {path: NamedSharding(mesh, spec) for path, spec in param_specs(state, cfg, mesh).items()}


def kv_cache_spec(cfg: ModelConfig, mesh: Mesh) -> PartitionSpec:
    """Pages [K, P, L, H] split on kv heads like k_proj's output (replicated when tp does not divide K)."""
    return logical_to_spec(("kv_heads", None, None, "head_dim"), cfg, mesh)


def kv_scale_spec(cfg: ModelConfig, mesh: Mesh) -> PartitionSpec:
    """Scales [K, P, L] of int8 / fp8 pages: split like their pages."""
    return logical_to_spec(("kv_heads", None, None), cfg, mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def print_plan(state: nnx.State, cfg: ModelConfig, mesh: Mesh, file=None) -> str:
    """Every param with its shape, logical axes, PartitionSpec and per-device shard shape; also printed."""
    lines = [f"mesh {dict(mesh.shape)}"]
    specs = param_specs(state, cfg, mesh)
    for path, var in nnx.to_flat_state(state):
        name = "/".join(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        shard = NamedSharding(mesh, specs[name]).shard_shape(shape)
        axes = var.get_metadata().get("out_sharding")
        lines.append(f"{name:40s} {str(shape):22s} {str(axes):45s} {str(specs[name]):28s} shard {shard}")
    spec = kv_cache_spec(cfg, mesh)
    lines.append(f"{'kv_cache (k and v, all layers)':40s} {'[K, layers * P, L, H]':22s} {'':45s} {str(spec):28s}")
    text = "\n".join(lines)
    print(text, file=file)
    return text


def shard_shape(array: jax.Array) -> tuple[int, ...]:
    """The shape of one device's piece of a sharded array."""
    return tuple(array.addressable_shards[0].data.shape)
