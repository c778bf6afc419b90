"""The adapter slots on the device: zeroed and placed at start (sharded like the layers they adapt), and the
program that writes one adapter into one slot (the slot number is runtime data: one program for every load)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jserve.config import ModelConfig
from jserve.lora.targets import LoRASpec, LoRAWeights
from jserve.parallel.sharding import logical_to_spec


def slot_shardings(spec: LoRASpec, cfg: ModelConfig, num_layers: int, mesh: Mesh) -> list[NamedSharding]:
    """A then B of each target, in ``spec.targets`` order: tensor parallel splits A's input and B's output dims
    like the base weight's (q/k/v/gate/up on heads / mlp by output, o/down by input), never the slot axes."""
    out = []
    for target in spec.targets:
        a_shape, b_shape = spec.a_shape(cfg, target, num_layers), spec.b_shape(cfg, target, num_layers)
        out.append(NamedSharding(mesh, logical_to_spec(spec.a_axes(cfg, target), cfg, mesh, a_shape)))
        out.append(NamedSharding(mesh, logical_to_spec(spec.b_axes(cfg, target), cfg, mesh, b_shape)))
    return out


def zero_slots(spec: LoRASpec, cfg: ModelConfig, num_layers: int, mesh: Mesh, dtype) -> LoRAWeights:
    """Every slot of every target zeroed, placed on ``mesh``."""
    shardings = iter(slot_shardings(spec, cfg, num_layers, mesh))
    weights = {}
    for target in spec.targets:
        a = jax.device_put(np.zeros(spec.a_shape(cfg, target, num_layers), dtype), next(shardings))
        b = jax.device_put(np.zeros(spec.b_shape(cfg, target, num_layers), dtype), next(shardings))
        weights[target] = (a, b)
    return weights


def _slot_axis(index: int, ndim: int) -> int:
    """The slot axis of the ``index``-th array of (A, B, A, B, ...): A [L, *in, S, R], B [L, S, R, *out]."""
    return ndim - 2 if index % 2 == 0 else 1


def one_slot_shapes(slots) -> list[tuple[int, ...]]:
    """The shape of one slot's values for each array of ``slots`` (the slot axis of size 1)."""
    shapes = []
    for i, array in enumerate(slots):
        shape = list(array.shape)
        shape[_slot_axis(i, array.ndim)] = 1
        shapes.append(tuple(shape))
    return shapes


def write_slot(slots: tuple[jax.Array, ...], slot: jax.Array, values: tuple[jax.Array, ...]) -> tuple:
    """``slots`` (A, B, A, B, ...) with slot ``slot`` (0-based) replaced by ``values`` (A [L, *in, 1, R],
    B [L, 1, R, *out] each)."""
    out = []
    for i, (array, value) in enumerate(zip(slots, values, strict=True)):
        start = [jnp.zeros((), jnp.int32)] * array.ndim
        start[_slot_axis(i, array.ndim)] = slot.astype(jnp.int32)
        out.append(jax.lax.dynamic_update_slice(array, value.astype(array.dtype), start))
    return tuple(out)
