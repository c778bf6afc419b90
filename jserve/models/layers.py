"""Small pure building blocks shared by the model families: RMSNorm, RoPE, MLP, embedding.

Every parameter names its logical axes (``sharding_names``); only ``jserve/parallel/sharding.py`` maps them to
mesh axes. Computation follows the HF reference implementations' numerics (norms in float32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jserve.config import ModelConfig, RopeScaling
from jserve.lora.targets import LayerLoRA
from jserve.quant.config import WeightQuant
from jserve.quant.weights import QuantizedWeight, dense_einsum, einsum

_INIT = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, init=_INIT) -> nnx.Param:
    """A parameter with logical axis names; values come from a checkpoint, the init only fixes shape/dtype.

    Models are only ever built abstractly (``nnx.eval_shape``), so the init draws from a constant key instead of
    advancing ``rngs``: each advance of an nnx RNG stream under tracing looked up the traced counter's origin
    through every op traced so far, O(params x ops), 8.5 s per abstract build of a 32-layer model."""
    del rngs  # kept in the signature: nnx modules thread it through their constructors
    return nnx.Param(init(jax.random.key(0), shape, dtype), out_sharding=axes, eager_sharding=False)


def linear_weight(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype,
    quant: WeightQuant | None,
    *,
    num_contracting: int = 1,
    name: str,
    leading_batch: bool = False,
) -> nnx.Param | QuantizedWeight:
    """A linear layer's weight laid out [*inputs, *outputs] (MoE: [experts, ...]): a dense param, or a
    QuantizedWeight of the same logical shape. ``name`` labels quantization errors."""
    if quant is None:
        return param(rngs, shape, axes, dtype)
    return QuantizedWeight(
        shape, axes, num_contracting=num_contracting, quant=quant, name=name, leading_batch=leading_batch
    )


def fixed_order_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis (keepdims) in an order fixed by that axis' length alone: halves added while the
    length is even, then the rest left to right. XLA picks a reduction's order from the whole array's shape (on
    CPU the rows of [T, D] sum differently for T <= 24 and T >= 32), so a token's sum moved by an ulp with the
    other tokens of its step, and per-token rounding downstream (fp8 activations, an int8 / fp8 KV cache) turns
    such an ulp into a whole quantization step now and then. Elementwise adds are the same on every shape."""
    while x.shape[-1] % 2 == 0 and x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    total = x[..., :1]
    for i in range(1, x.shape[-1]):
        total = total + x[..., i : i + 1]
    return total


class RMSNorm(nnx.Module):
    """Root-mean-square norm; Gemma scales by (1 + w) and keeps the multiply in float32."""

    def __init__(self, dim: int, eps: float, *, unit_offset: bool, dtype, rngs: nnx.Rngs, axis: str = "embed"):
        init = nnx.initializers.zeros if unit_offset else nnx.initializers.ones
        self.weight = param(rngs, (dim,), (axis,), dtype, init)
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        # a fixed summation order: the mean of a token must not depend on the other tokens of its step
        normed = x32 * jax.lax.rsqrt(fixed_order_sum(x32 * x32) / x.shape[-1] + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return normed.astype(x.dtype) * self.weight[...]


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
    """Per-pair rotation frequencies [H/2], with llama3 or linear scaling applied."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def _longrope_frequencies(head_dim: int, theta: float, factors: tuple[float, ...]) -> jax.Array:
    """The unscaled frequencies, each divided by its longrope factor."""
    return rope_inverse_frequencies(head_dim, theta, RopeScaling()) / jnp.asarray(factors, jnp.float32)


def rope_tables(
    positions: jax.Array, seq_lens: jax.Array | None, head_dim: int, theta: float, scaling: RopeScaling
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [T, H/2] of each token's rotation. longrope (Phi-3) rotates a token with its long factors when
    its sequence, this step included (``seq_lens`` [T]), is longer than the original context (transformers' rule
    for the sequence being run), and scales cos/sin by the attention factor."""
    pos = positions.astype(jnp.float32)[:, None]
    if scaling.rope_type != "longrope":
        angles = pos * rope_inverse_frequencies(head_dim, theta, scaling)[None, :]
        return jnp.cos(angles), jnp.sin(angles)
    short = _longrope_frequencies(head_dim, theta, scaling.short_factor)
    long = _longrope_frequencies(head_dim, theta, scaling.long_factor)
    use_long = (seq_lens > scaling.original_max_position_embeddings)[:, None]
    angles = pos * jnp.where(use_long, long[None, :], short[None, :])
    factor = 1.0 if scaling.attention_factor is None else scaling.attention_factor
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [T, heads, H] by the per-token tables [T, H/2] (HF "rotate_half" layout: first half pairs with
    second half)."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def activation(name: str):
    """The same function object for the same name: it is a static attribute of each layer's graph, and layers
    with equal graphs share a stack (``layer_stack``)."""
    if name == "silu":
        return jax.nn.silu
    return _gelu_tanh if name == "gelu_pytorch_tanh" else _gelu_exact


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) — SwiGLU for Llama, GeGLU-tanh for Gemma."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        quant = cfg.weight_quant
        self.gate_proj = linear_weight(rngs, (d, f), ("embed", "mlp"), dtype, quant, name="gate_proj")
        self.up_proj = linear_weight(rngs, (d, f), ("embed", "mlp"), dtype, quant, name="up_proj")
        self.down_proj = linear_weight(rngs, (f, d), ("mlp", "embed"), dtype, quant, name="down_proj")
        if cfg.mlp_bias:
            self.gate_bias = param(rngs, (f,), ("mlp",), dtype, nnx.initializers.zeros)
            self.up_bias = param(rngs, (f,), ("mlp",), dtype, nnx.initializers.zeros)
            self.down_bias = param(rngs, (d,), ("embed",), dtype, nnx.initializers.zeros)
        self.mlp_bias = cfg.mlp_bias
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array, lora: LayerLoRA | None = None) -> jax.Array:  # [T, D] -> [T, D]
        gate = einsum("td,df->tf", x, self.gate_proj)
        up = einsum("td,df->tf", x, self.up_proj)
        if self.mlp_bias:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        if lora is not None:
            gate, up = lora.add("gate_proj", x, gate), lora.add("up_proj", x, up)
        hidden = self.act(gate) * up
        out = einsum("tf,fd->td", hidden, self.down_proj)
        if self.mlp_bias:
            out = out + self.down_bias[...]
        return out if lora is None else lora.add("down_proj", hidden, out)


class Embedding(nnx.Module):
    """Token embedding; also serves as the LM head when embeddings are tied."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.scale = math.sqrt(cfg.hidden_size) if cfg.embed_scale else None

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [T] -> [T, D]
        x = jnp.take(self.embedding[...], tokens, axis=0)
        if self.scale is not None:
            x = x * jnp.asarray(self.scale, dtype=x.dtype)  # HF casts the normalizer to the model dtype
        return x

    def attend(self, x: jax.Array) -> jax.Array:  # [B, D] -> [B, V] float32
        return dense_einsum("bd,vd->bv", x, self.embedding[...], out_dtype=jnp.float32)
