"""What an adapter can adapt and how the step applies it.

The device holds ``max_loras`` adapter slots per target projection, for every layer of a stage at once:
``A [layers, *in_dims, slots, rank]`` and ``B [layers, slots, rank, *out_dims]`` (ranks below ``max_lora_rank``
are zero-padded, the adapter's scale is folded into B). Each token carries the number of its slot (0: the base
model, 1..slots: an adapter) as runtime data, so one program serves any mix of adapters and loading one only
writes into a slot.

The update of a projection is two dense matmuls over all slots at once, ``(x @ A) * mask @ B`` with the mask
keeping each token's own slot columns: no gathers, and every token's update depends on its own row only
(batch invariant). A base token's mask is all zeros, so its update is exactly zero; a step without any
adapter token skips the updates altogether (a ``lax.cond`` per projection), so enabling LoRA costs base
requests nothing but that branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jserve.config import ModelConfig
from jserve.lora.request import ALL_TARGETS, MLP_TARGETS
from jserve.quant.weights import dense_einsum


@dataclass(frozen=True)
class TargetDims:
    """A projection's input and output dims (ours, not HF's flat ones) and their logical axes."""

    in_dims: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_dims: tuple[int, ...]
    out_axes: tuple[str | None, ...]

    @property
    def in_size(self) -> int:
        return math.prod(self.in_dims)

    @property
    def out_size(self) -> int:
        return math.prod(self.out_dims)


def target_dims(cfg: ModelConfig, target: str) -> TargetDims:
    d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    table = {
        "q_proj": TargetDims((d,), ("embed",), (n, h), ("q_heads", "head_dim")),
        "k_proj": TargetDims((d,), ("embed",), (k, h), ("kv_heads", "head_dim")),
        "v_proj": TargetDims((d,), ("embed",), (k, h), ("kv_heads", "head_dim")),
        "o_proj": TargetDims((n, h), ("q_heads", "head_dim"), (d,), ("embed",)),
        "gate_proj": TargetDims((d,), ("embed",), (f,), ("mlp",)),
        "up_proj": TargetDims((d,), ("embed",), (f,), ("mlp",)),
        "down_proj": TargetDims((f,), ("mlp",), (d,), ("embed",)),
    }
    return table[target]


@dataclass(frozen=True)
class LoRASpec:
    """The engine's adapter slots: how many, their rank, and the projections they cover."""

    max_loras: int
    max_lora_rank: int
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora_target_modules must be a non-empty subset of {list(ALL_TARGETS)}, got {unknown}")
        # sorted: the order in which a dict of targets flattens (the slot write's arguments follow it)
        object.__setattr__(self, "targets", tuple(sorted(set(self.targets))))

    @classmethod
    def for_model(cls, cfg: ModelConfig, max_loras: int, max_lora_rank: int, targets=None) -> LoRASpec:
        """The requested targets (default: every projection) that exist in the model: an MoE model's experts
        take no adapters (their MLP targets are dropped when no layer has a dense MLP)."""
        wanted = tuple(ALL_TARGETS if targets is None else targets)
        dense_mlp = any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers))
        available = [t for t in ALL_TARGETS if t in wanted and (dense_mlp or t not in MLP_TARGETS)]
        return cls(max_loras, max_lora_rank, tuple(available) if available else wanted)

    def a_shape(self, cfg: ModelConfig, target: str, num_layers: int) -> tuple[int, ...]:
        return (num_layers, *target_dims(cfg, target).in_dims, self.max_loras, self.max_lora_rank)

    def b_shape(self, cfg: ModelConfig, target: str, num_layers: int) -> tuple[int, ...]:
        return (num_layers, self.max_loras, self.max_lora_rank, *target_dims(cfg, target).out_dims)

    def nbytes(self, cfg: ModelConfig, num_layers: int, itemsize: int) -> int:
        """Bytes of every slot of ``num_layers`` layers (an upper bound per device: tensor parallel splits some)."""
        elements = sum(
            math.prod(self.a_shape(cfg, t, num_layers)) + math.prod(self.b_shape(cfg, t, num_layers))
            for t in self.targets
        )
        return elements * itemsize

    @staticmethod
    def a_axes(cfg: ModelConfig, target: str) -> tuple[str | None, ...]:
        return (None, *target_dims(cfg, target).in_axes, None, None)

    @staticmethod
    def b_axes(cfg: ModelConfig, target: str) -> tuple[str | None, ...]:
        return (None, None, None, *target_dims(cfg, target).out_axes)


LoRAWeights = dict[str, tuple[jax.Array, jax.Array]]
"""A stage's adapter slots: target -> (A, B), stacked over the stage's layers (``LoRASpec.a_shape``)."""


def token_mask(token_slots: jax.Array, num_slots: int, dtype) -> jax.Array:
    """[T, slots]: 1 where the token's slot (1-based; 0 = base model) is that column."""
    return (token_slots[:, None] == jnp.arange(1, num_slots + 1, dtype=token_slots.dtype)[None, :]).astype(dtype)


@dataclass(frozen=True)
class LayerLoRA:
    """One layer's adapter slots and the step's token mask; ``add`` applies a target's update."""

    weights: LoRAWeights  # the stage's slots, stacked over its layers
    index: int | jax.Array  # this layer's position in the stage (traced inside a loop over stacked layers)
    mask: jax.Array  # [T, S]
    active: jax.Array  # [] bool: some token of the step has an adapter

    def add(self, target: str, x: jax.Array, out: jax.Array) -> jax.Array:
        """``out`` ([T, *out_dims], the base projection of ``x`` [T, *in_dims]) plus each token's update."""
        if target not in self.weights:
            return out

        def updated(x, out, a, b, mask):  # the layer's slice is taken here: a step without adapters copies nothing
            a, b = a[self.index], b[self.index]
            slots, rank = a.shape[-2], a.shape[-1]
            tokens = x.shape[0]
            shrunk = dense_einsum("ti,ir->tr", x.reshape(tokens, -1), a.reshape(-1, slots * rank))
            shrunk = (shrunk.reshape(tokens, slots, rank) * mask[:, :, None].astype(shrunk.dtype)).reshape(tokens, -1)
            delta = dense_einsum("tr,ro->to", shrunk, b.reshape(slots * rank, -1), out_dtype=out.dtype)
            return out + delta.reshape(out.shape)

        with jax.named_scope("lora"):
            a, b = self.weights[target]
            return jax.lax.cond(self.active, updated, lambda x, out, a, b, mask: out, x, out, a, b, self.mask)


@dataclass(frozen=True)
class StepLoRA:
    """A stage's slots and this step's token mask; ``layer(j)`` picks the stage's j-th layer (j may be traced,
    inside a loop over stacked layers)."""

    weights: LoRAWeights
    mask: jax.Array  # [T, S]
    active: jax.Array  # [] bool: some token of the step has an adapter

    @classmethod
    def for_step(cls, weights: LoRAWeights, token_slots: jax.Array, dtype) -> StepLoRA:
        """The slots ``weights`` and each token's slot ``token_slots`` [T] (1-based; 0: the base model)."""
        num_slots = next(iter(weights.values()))[0].shape[-2]
        return cls(weights, token_mask(token_slots, num_slots, dtype), jnp.any(token_slots > 0))

    def layer(self, index) -> LayerLoRA:
        return LayerLoRA(self.weights, index, self.mask, self.active)
