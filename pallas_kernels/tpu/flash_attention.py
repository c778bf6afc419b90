"""Flash attention (prefill) for TPU (Pallas Mosaic TPU).

Work split
----------
Grid ``(B, K kv heads, Tq / bq query blocks, Tk / bk key blocks)``; the key axis is the innermost, sequential
("arbitrary") one and carries the online-softmax state (m, l, acc) in VMEM scratch; the other three are
independent ("parallel").

* GQA without repeating K/V: one program owns one KV head; its rows are the ``G = N / K`` query heads of that
  KV head for ``bq`` tokens, packed g-major into ``[G * bq, H]`` (the wrapper lays q out as ``[B, K, G, Tq,
  H]``), so each K/V tile is DMA'd once for all G heads and feeds the MXU with ``G * bq`` rows.
* Causal masking and sliding windows bound the key blocks a query block can see to ``[lo(i), hi(i)]``. Blocks
  outside are skipped twice over: their compute is guarded by ``pl.when`` and their K/V index map is clamped
  to the nearest visible block, so the pipeline sees an unchanged block index and issues no DMA for them.
* ``segment_ids`` (packed variable-length prefill) and the logit soft-cap are applied per tile as masks /
  elementwise maps; fully masked rows (e.g. a query whose segment has no visible key) produce zeros.

Causal alignment is bottom-right as in the reference: query t sits at position ``t + Tk - Tq``. Scores,
softmax and accumulation are float32; the two matmuls take the input dtype (bf16 or fp32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.checks import check_attention_args
from pallas_kernels.compat import pl
from pallas_kernels.tpu import tuning

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _visible_blocks(i, *, bq, bk, offset, causal, sliding_window, num_kv_blocks):
    """[lo, hi] key blocks that query block i can see (hi < lo: none)."""
    if causal:
        hi = jnp.minimum(((i + 1) * bq - 1 + offset) // bk, num_kv_blocks - 1)
    else:
        hi = jnp.int32(num_kv_blocks - 1)
    if sliding_window is not None:
        lo = jnp.maximum(i * bq + offset - sliding_window + 1, 0) // bk
    else:
        lo = jnp.int32(0)
    return lo, hi


def _kernel(*refs, sm_scale, causal, sliding_window, soft_cap, has_segments, kv_len, offset, num_kv_blocks):
    if has_segments:
        q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, m_ref, l_ref, acc_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref = refs
    group, bq, head_dim = q_ref.shape
    bk = k_ref.shape[0]
    rows = group * bq
    i = pl.program_id(2)
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = _visible_blocks(
        i,
        bq=bq,
        bk=bk,
        offset=offset,
        causal=causal,
        sliding_window=sliding_window,
        num_kv_blocks=num_kv_blocks,
    )

    @pl.when((j >= lo) & (j <= hi))
    def _():
        q = q_ref[...].reshape(rows, head_dim)
        k = k_ref[...]
        v = v_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        q_pos = i * bq + offset + lax.broadcasted_iota(jnp.int32, (group, bq, 1), 1).reshape(rows, 1)
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = k_pos < kv_len
        if causal:
            mask = mask & (k_pos <= q_pos)
        if sliding_window is not None:
            mask = mask & (q_pos - k_pos < sliding_window)
        if has_segments:
            q_seg = jnp.tile(qseg_ref[...], (group, 1))  # [rows, 1]
            mask = mask & (q_seg == kvseg_ref[...])
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    @pl.when(j == num_kv_blocks - 1)
    def _():
        denom = l_ref[...]
        inv = jnp.where(denom == 0.0, 0.0, 1.0 / jnp.where(denom == 0.0, 1.0, denom))
        o_ref[...] = (acc_ref[...] * inv).reshape(o_ref.shape).astype(o_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
        "sliding_window",
        "sm_scale",
        "logit_soft_cap",
        "interpret",
        "block_q",
        "block_kv",
    ),
)
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    sm_scale: float | None = None,
    segment_ids: jax.Array | None = None,
    logit_soft_cap: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Dense attention (semantics: ``pallas_kernels.reference.flash_attention``).

    q [B, Tq, N, H]; k, v [B, Tk, K, H]; segment_ids [B, Tq] (keys use ``segment_ids[:, -Tk:]``, so Tk <= Tq
    when segment_ids is given). ``block_q`` (query tokens) and ``block_kv`` (keys) override the tuning table.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = check_attention_args(
        num_heads, num_kv_heads, sliding_window, segment_ids=segment_ids, q_len=q_len, kv_len=kv_len
    )
    scale = head_dim**-0.5 if sm_scale is None else float(sm_scale)
    defaults = tuning.flash_blocks(q_len, kv_len, group, head_dim)
    bq = block_q or defaults.q_tokens
    bk = block_kv or defaults.kv
    q_pad = _round_up(q_len, bq)
    kv_pad = _round_up(kv_len, bk)
    num_q_blocks, num_kv_blocks = q_pad // bq, kv_pad // bk
    offset = kv_len - q_len

    qt = jnp.pad(q, ((0, 0), (0, q_pad - q_len), (0, 0), (0, 0)))
    qt = qt.reshape(batch, q_pad, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tq, H]
    kt = jnp.pad(k, ((0, 0), (0, kv_pad - kv_len), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, K, Tk, H]
    vt = jnp.pad(v, ((0, 0), (0, kv_pad - kv_len), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    visible = functools.partial(
        _visible_blocks,
        bq=bq,
        bk=bk,
        offset=offset,
        causal=causal,
        sliding_window=sliding_window,
        num_kv_blocks=num_kv_blocks,
    )

    def kv_block(i, j):
        lo, hi = visible(i)
        return jnp.clip(jnp.clip(j, lo, hi), 0, num_kv_blocks - 1)

    q_spec = pl.BlockSpec((None, None, group, bq, head_dim), lambda b, h, i, j: (b, h, 0, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, i, j: (b, h, kv_block(i, j), 0))
    in_specs = [q_spec, kv_spec, kv_spec]
    operands = [qt, kt, vt]
    has_segments = segment_ids is not None
    if has_segments:
        seg = segment_ids.astype(jnp.int32)
        kv_seg = seg if kv_len == q_len else seg[:, -kv_len:]
        q_seg = jnp.pad(seg, ((0, 0), (0, q_pad - q_len)), constant_values=-1)[:, :, None]  # [B, Tq, 1]
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, kv_pad - kv_len)), constant_values=-2)[:, None, :]  # [B, 1, Tk]
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, kv_block(i, j))),
        ]
        operands += [q_seg, kv_seg]
    rows = group * bq
    kernel = functools.partial(
        _kernel,
        sm_scale=scale,
        causal=causal,
        sliding_window=sliding_window,
        soft_cap=logit_soft_cap,
        has_segments=has_segments,
        kv_len=kv_len,
        offset=offset,
        num_kv_blocks=num_kv_blocks,
    )
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_q_blocks, num_kv_blocks),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        scratch_shapes=[
            compat.TPU_VMEM((rows, 1), jnp.float32),
            compat.TPU_VMEM((rows, 1), jnp.float32),
            compat.TPU_VMEM((rows, head_dim), jnp.float32),
        ],
        compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=compat.tpu_interpret(interpret),
        name="jserve_flash_attention",
    )(*operands)
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, q_pad, num_heads, head_dim)
    return out[:, :q_len]
