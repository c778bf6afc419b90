"""Quantized linear weights: low-bit values plus float scales, multiplied through qwix.

A model builds each linear weight with ``jserve.models.layers.linear_weight``: a plain ``nnx.Param`` when
unquantized, else a ``QuantizedWeight`` (``values`` in int8 / int4 / float8_e4m3fn with the dense weight's shape
and logical axes, ``scale`` float32 with the contraction dims reduced to groups; int4 is stored as uint8 pairs).
``einsum`` and ``ragged_dot`` take either, so a quantized layer reads exactly like a dense one.

Products dequantize a ``qwix.QArray`` right before the dot (``qwix.dequantize`` into ``jnp.einsum``, and
``qwix.ragged_dot``), which XLA fuses into the matmul (weights stay packed in HBM).
We use qwix's arrays and products, not its ``quantize_model`` interception (which rewrites ops while tracing the
model with sample inputs): our forward takes a paged KV cache and backend metadata, pre-quantized checkpoints
need explicit params with logical axes, and loading quantizes tensor by tensor on the host.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from jserve.quant.config import WeightQuant
from pallas_kernels.reference import absmax_quantize

FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


def group_scale_shape(contracting: tuple[int, ...], group_size: int | None, name: str) -> tuple[int, ...]:
    """Scale dims over the contraction dims: one scale per ``group_size`` consecutive elements of the flattened
    input (None: per output channel, all ones). Groups may span trailing dims (o_proj's [heads, head_dim] with
    head_dim 64 and groups of 128 -> [heads / 2, 1]); the flattened group order is row-major either way."""
    if group_size is None:
        return (1,) * len(contracting)
    flat = math.prod(contracting)
    if flat % group_size:
        raise ValueError(f"quantization_group_size {group_size} does not divide {name}'s input dim {flat}")
    out, rest = [], group_size
    for dim in reversed(contracting):
        if rest == 1:
            out.append(dim)
        elif rest >= dim:
            if rest % dim:
                raise ValueError(f"quantization_group_size {group_size} does not tile {name}'s dims {contracting}")
            out.append(1)
            rest //= dim
        else:
            if dim % rest:
                raise ValueError(f"quantization_group_size {group_size} does not tile {name}'s dims {contracting}")
            out.append(dim // rest)
            rest = 1
    return tuple(reversed(out))


class QuantizedWeight(nnx.Module):
    """A linear weight as (values, scale); ``name`` only labels errors."""

    def __init__(
        self,
        shape: tuple[int, ...],
        axes: tuple[str | None, ...],
        *,
        num_contracting: int,
        quant: WeightQuant,
        name: str,
        leading_batch: bool = False,
    ):
        lead = 1 if leading_batch else 0
        contracting = shape[lead : lead + num_contracting]
        sshape = shape[:lead] + group_scale_shape(contracting, quant.group_size, name) + shape[lead + num_contracting :]
        scale_axes = tuple(a if s > 1 else None for a, s in zip(axes, sshape, strict=True))
        stored = shape
        if quant.method == "int4":
            if shape[-1] % 2:
                raise ValueError(f"quantization='int4' packs two values per byte along {name}'s last dim {shape[-1]}")
            stored = shape[:-1] + (shape[-1] // 2,)
        dtype = jnp.uint8 if quant.method == "int4" else quant.storage_dtype
        self.values = nnx.Param(jnp.zeros(stored, dtype), out_sharding=axes, eager_sharding=False)
        self.scale = nnx.Param(jnp.ones(sshape, jnp.float32), out_sharding=scale_axes, eager_sharding=False)
        self.fp8_activations = quant.fp8_activations

    def qarray(self, dtype) -> qwix.QArray:
        """Scales in the activation dtype, so the dequantized weight and the matmul run in it."""
        values = self.values[...]
        if values.dtype == jnp.uint8:  # int4 pairs: a free bitcast, [..., n/2] bytes -> [..., n] int4
            values = jax.lax.bitcast_convert_type(values, jnp.int4).reshape(*values.shape[:-1], -1)
        return qwix.QArray(values, self.scale[...].astype(dtype), qtype=values.dtype)


def fake_quantize_fp8_per_token(x: jax.Array) -> jax.Array:
    """Rounds each token row (dim 0) to e4m3 with its own absmax scale and back: the FP8_DYNAMIC activation
    scheme, computed in x's dtype (a W8A8 fp8 matmul would consume the e4m3 values directly)."""
    values, scale = absmax_quantize(x.reshape(x.shape[0], -1), jnp.float8_e4m3fn)
    return (values.astype(jnp.float32) * scale[:, None]).reshape(x.shape).astype(x.dtype)


def einsum(equation: str, x: jax.Array, weight, *, out_dtype=None) -> jax.Array:
    """``jnp.einsum(equation, x, weight)`` for a dense param or a QuantizedWeight. A quantized weight is
    dequantized (``qwix.dequantize``, which XLA fuses into the dot: what ``qwix.einsum`` does for a float
    operand) and multiplied by the same ``jnp.einsum`` as a dense one, activations on the left. ``qwix.einsum``
    put [d, heads, head_dim] weights on the left of its dot, which XLA:CPU sums in an order that changes with
    the number of tokens in the step: an ulp of batch dependence, which per-token fp8 activations round into
    whole e4m3 steps downstream."""
    if isinstance(weight, QuantizedWeight):
        if weight.fp8_activations:
            x = fake_quantize_fp8_per_token(x)
        return dense_einsum(equation, x, qwix.dequantize(weight.qarray(x.dtype)), out_dtype=out_dtype)
    return dense_einsum(equation, x, weight[...], out_dtype=out_dtype)


_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def dense_einsum(equation: str, x: jax.Array, weight: jax.Array, *, out_dtype=None) -> jax.Array:
    """``jnp.einsum(equation, x, weight)`` with the result in ``out_dtype`` (default: x's dtype), the first axis of
    x being the tokens (rows). Float32 operands take exactly ``jnp.einsum``.

    Half-precision operands accumulate in float32 and round once at the end, which is what torch does, and on
    XLA:CPU it is also the fast path: with a float32 result its bf16 product ran 1.5-1.75x faster than float32
    (AVX512-BF16, 2 cores, [8..256] x [1024, 4096]), with a bf16 result 3x slower. A one-row bf16 product takes a
    path 8x slower than float32 there (a one-row [1, 1024] x [1024, 4096]: 5.7 ms per 8 vs 45.7 ms), and two rows
    the fast one (4.9 ms), so on CPU a one-row x is padded to two."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if x.dtype not in _HALF and weight.dtype not in _HALF:
        out = jnp.einsum(equation, x, weight)
        return out if out.dtype == out_dtype else out.astype(out_dtype)
    pad = x.shape[0] == 1 and jax.default_backend() == "cpu"
    if pad:
        x = jnp.concatenate([x, jnp.zeros_like(x)])
    out = jnp.einsum(equation, x, weight, preferred_element_type=jnp.float32).astype(out_dtype)
    return out[:1] if pad else out


def ragged_dot(rows: jax.Array, weight, group_sizes: jax.Array) -> jax.Array:
    """``jax.lax.ragged_dot`` (MoE experts [E, in, out]) for a dense param or a QuantizedWeight."""
    if isinstance(weight, QuantizedWeight):
        if weight.fp8_activations:
            rows = fake_quantize_fp8_per_token(rows)
        return qwix.ragged_dot(rows, weight.qarray(rows.dtype), group_sizes)
    return jax.lax.ragged_dot(rows, weight[...], group_sizes)


def quantize(dense: np.ndarray, scale_dims: tuple[int, ...], storage_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Host-side symmetric absmax quantization of one weight, before it is placed (loading goes tensor by
    tensor). ``scale_dims``: the scale's shape, the weight's dims divided into groups (1: the whole dim shares a
    scale). Each group's absmax maps to qmax (127, 7; 448 for e4m3), so no value rounds past the range.
    Returns numpy (values, float32 scale)."""
    w = np.asarray(dense, np.float32)
    split = []  # [s0, g0, s1, g1, ...]: each dim as (groups, elements per group)
    for dim, groups in zip(w.shape, scale_dims, strict=True):
        split += [groups, dim // groups]
    grouped = w.reshape(split)
    absmax = np.abs(grouped).max(axis=tuple(range(1, len(split), 2)), keepdims=True)
    storage = np.dtype(storage_dtype)
    fp8 = storage == np.dtype(jnp.float8_e4m3fn)
    qmax = FP8_MAX if fp8 else (127.0 if storage == np.int8 else 7.0)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    scaled = grouped / scale
    if fp8:
        values = scaled.astype(storage)
    else:
        values = np.clip(np.rint(scaled), -qmax, qmax).astype(np.int8)
    return values.reshape(w.shape), scale.reshape(scale_dims)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """int4 values [..., n] -> uint8 [..., n/2]; element 2j in the low nibble, as XLA's bitcast to int4 reads it.
    Packing by hand (not jnp.int4 params) keeps two values per byte on every backend and every jax version."""
    v = np.asarray(values).astype(np.int8).astype(np.uint8) & np.uint8(0xF)
    return v[..., 0::2] | (v[..., 1::2] << np.uint8(4))
