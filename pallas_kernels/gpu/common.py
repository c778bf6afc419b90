"""Pieces shared by the Mosaic GPU attention kernels: the two ``wgmma`` products and the online-softmax step.

Softmax runs in base 2: scores are pre-multiplied by ``log2(e)`` so that ``exp2`` (one MUFU instruction)
replaces ``exp``. The running maximum starts at a finite ``-1e30`` and masked scores are ``-inf``: a row that
has seen no key keeps ``p = 0`` and ``alpha = 1`` without any NaN.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.compat import pl, plgpu

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
M_INIT = -1e30
SUPPORTED_MMA_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def mma_dtype(dtype) -> jnp.dtype:
    """wgmma takes 16-bit floats; fp32 inputs are rounded to bf16 (tf32 would need a K-major V, see docs)."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype in SUPPORTED_MMA_DTYPES else jnp.dtype(jnp.bfloat16)


def qk_scores(q_smem, k_smem, interpret: bool):
    """S = Q @ K^T: q [M, H], k [bk, H] in SMEM -> [M, bk] float32 (WGMMA layout)."""
    rows = q_smem.shape[0]
    keys = k_smem.shape[0]

    def product(acc_ref):
        compat.gpu_wgmma_bt(acc_ref, q_smem, k_smem, interpret)
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((rows, keys), jnp.float32))


def pv_product(p, v_smem, interpret: bool):
    """P @ V: p [M, bk] registers (16-bit), v [bk, H] in SMEM -> [M, H] float32."""
    rows = p.shape[0]
    head_dim = v_smem.shape[1]

    def product(acc_ref):
        compat.gpu_wgmma_reg_a(acc_ref, p, v_smem, interpret)
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((rows, head_dim), jnp.float32))


def init_state(rows: int, head_dim: int, interpret: bool):
    m = compat.gpu_row_vector(jnp.full((rows,), M_INIT, jnp.float32), interpret)
    denom = compat.gpu_row_vector(jnp.zeros((rows,), jnp.float32), interpret)
    acc = compat.gpu_layout_cast(jnp.zeros((rows, head_dim), jnp.float32), "WGMMA", interpret)
    return m, denom, acc


def scale_scores(s, sm_scale: float, soft_cap: float | None):
    """Raw Q.K -> base-2 logits (soft cap applied in the natural domain first)."""
    if soft_cap is None:
        return s * (sm_scale * LOG2E)
    return jnp.tanh(s * (sm_scale / soft_cap)) * (soft_cap * LOG2E)


def softmax_step(s2, mask, state, v_smem, mm_dtype, interpret: bool, p_scale=None):
    """One online-softmax update with base-2 logits ``s2`` [M, bk]; returns the new (m, l, acc)."""
    m, denom, acc = state
    if mask is not None:
        s2 = jnp.where(mask, s2, -jnp.inf)
    m_new = jnp.maximum(m, s2.max(axis=1))
    p = jnp.exp2(s2 - lax.broadcast_in_dim(m_new, s2.shape, [0]))
    alpha = jnp.exp2(m - m_new)
    denom = denom * alpha + p.sum(axis=1)
    if p_scale is not None:
        p = p * p_scale
    pv = pv_product(p.astype(mm_dtype), v_smem, interpret)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
    return m_new, denom, acc


def finish(state):
    """(m, l, acc) -> normalised output [M, H] f32 and natural-log LSE [M] (rows with no key: 0 and -1e30)."""
    m, denom, acc = state
    empty = denom == 0.0
    inv = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, denom))
    out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    lse = jnp.where(empty, M_INIT, (m + jnp.log2(jnp.where(empty, 1.0, denom))) * LN2)
    return out, lse
