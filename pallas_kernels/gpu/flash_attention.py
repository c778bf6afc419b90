"""Flash attention (prefill) for NVIDIA Hopper (Pallas Mosaic GPU).

Work split
----------
Grid ``(Tq / bq query blocks, K kv heads, B)``, one warpgroup per program (CTA):

* GQA without repeating K/V: a program owns one KV head and ``bq`` query tokens; its ``M = G * bq`` rows are
  the G query heads of that KV head, g-major (row ``g * bq + t``), loaded by G TMA copies. ``M`` is a multiple
  of 64 (the ``wgmma`` tile height), so one K/V tile in SMEM serves all G heads: K/V bytes are read once per
  KV head.
* the program streams the key blocks it can see, ``[lo, hi]`` (causal: up to its last token; sliding window:
  from its first token's window start). Blocks outside are never fetched. Inside the range, blocks that need
  no mask (entirely below the diagonal, inside the window and inside the sequence, no segment ids) run a
  mask-free step; only the edge blocks pay for the mask.
* K/V tiles arrive by TMA in a ``stages``-deep SMEM ring: the copy for step j + stages is issued as soon as
  step j is done with its slot, so copies overlap the ``wgmma`` products and the exp2-based online softmax.
* ``segment_ids`` (packed variable-length prefill) are staged through SMEM like the tiles and compared per
  block; a query with no visible key gets zeros. The logit soft-cap is ``cap * tanh(s / cap)``.

Causal alignment is bottom-right (query t at position ``t + Tk - Tq``), as in the reference. MMAs take
bf16/fp16 (fp32 inputs are rounded to bf16); softmax and accumulation are fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.checks import check_attention_args
from pallas_kernels.compat import pl, plgpu
from pallas_kernels.gpu import common, tuning


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _block_ranges(t0, *, bq, bk, offset, kv_len, causal, sliding_window, has_segments, num_kv_blocks):
    """Visible key blocks [lo, hi] of a query block, and [m1, m2) among them that need no mask."""
    first_pos = t0 + offset
    last_pos = t0 + bq - 1 + offset
    hi = jnp.minimum(last_pos // bk, num_kv_blocks - 1) if causal else jnp.int32(num_kv_blocks - 1)
    lo = jnp.maximum(first_pos - sliding_window + 1, 0) // bk if sliding_window is not None else jnp.int32(0)
    end = jnp.maximum(hi + 1, lo)
    if has_segments:
        return lo, end, end, end
    full_hi = kv_len // bk - 1  # last block without padding keys
    if causal:
        full_hi = jnp.minimum(full_hi, (first_pos + 1) // bk - 1)
    full_lo = jnp.int32(0)
    if sliding_window is not None:
        full_lo = jnp.maximum((last_pos - sliding_window + 1 + bk - 1) // bk, 0)
    m1 = jnp.clip(full_lo, lo, end)
    m2 = jnp.clip(full_hi + 1, m1, end)
    return lo, m1, m2, end


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    *refs,
    sm_scale,
    causal,
    sliding_window,
    soft_cap,
    has_segments,
    group,
    bq,
    bk,
    stages,
    offset,
    kv_len,
    num_kv_blocks,
    mm_dtype,
    separate_out,
    interpret,
):
    refs = list(refs)
    if has_segments:
        qseg_ref, kvseg_ref = refs.pop(0), refs.pop(0)
    o_ref = refs.pop(0)
    q_smem, k_smem, v_smem = refs[:3]
    refs = refs[3:]
    o_smem = refs.pop(0) if separate_out else q_smem  # q's tile is free once the last step is done
    if has_segments:
        qseg_smem, kvseg_smem = refs.pop(0), refs.pop(0)
    q_bar, k_bars, v_bars = refs

    qi = lax.axis_index("q")
    h = lax.axis_index("h")
    b = lax.axis_index("b")
    rows, head_dim = q_smem.shape
    t0 = qi * bq

    for g in range(group):
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(t0, bq), h * group + g], q_smem.at[pl.ds(g * bq, bq)], q_bar.at[0])
    if has_segments:  # already laid out per row (g-major) by the wrapper: one copy of M int32
        plgpu.copy_gmem_to_smem(qseg_ref.at[b, qi], qseg_smem, q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[0])

    row = compat.gpu_iota((rows, bk), 0, interpret)
    col = compat.gpu_iota((rows, bk), 1, interpret)
    q_pos = t0 + offset + lax.rem(row, bq)
    if has_segments:
        q_seg = lax.broadcast_in_dim(compat.gpu_load(qseg_smem, "WGMMA", interpret, reduced_dim=1), (rows, bk), [0])

    lo, m1, m2, end = _block_ranges(
        t0,
        bq=bq,
        bk=bk,
        offset=offset,
        kv_len=kv_len,
        causal=causal,
        sliding_window=sliding_window,
        has_segments=has_segments,
        num_kv_blocks=num_kv_blocks,
    )

    def issue(blk, slot):
        keys = pl.ds(blk * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bars.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bars.at[slot])
        if has_segments:
            plgpu.copy_gmem_to_smem(kvseg_ref.at[b, keys], kvseg_smem.at[slot], k_bars.at[slot])

    for st in range(stages):

        @pl.when(lo + st < end)
        def _(st=st):
            issue(lo + st, st)

    def step(blk, state, masked: bool):
        slot = lax.rem(blk - lo, stages)
        plgpu.barrier_wait(k_bars.at[slot])
        s2 = common.scale_scores(common.qk_scores(q_smem, k_smem.at[slot], interpret), sm_scale, soft_cap)
        mask = None
        if masked:
            k_pos = blk * bk + col
            mask = k_pos < kv_len
            if causal:
                mask = mask & (k_pos <= q_pos)
            if sliding_window is not None:
                mask = mask & (q_pos - k_pos < sliding_window)
            if has_segments:
                kv_seg = compat.gpu_load(kvseg_smem.at[slot], "WGMMA", interpret, reduced_dim=0)
                mask = mask & (q_seg == lax.broadcast_in_dim(kv_seg, (rows, bk), [1]))
        plgpu.barrier_wait(v_bars.at[slot])
        state = common.softmax_step(s2, mask, state, v_smem.at[slot], mm_dtype, interpret)

        @pl.when(blk + stages < end)
        def _():
            issue(blk + stages, slot)

        return state

    state = common.init_state(rows, head_dim, interpret)
    state = lax.fori_loop(lo, m1, functools.partial(step, masked=True), state)
    state = lax.fori_loop(m1, m2, functools.partial(step, masked=False), state)
    state = lax.fori_loop(m2, end, functools.partial(step, masked=True), state)
    out, _ = common.finish(state)

    o_smem[...] = out.astype(o_smem.dtype)
    plgpu.commit_smem()
    for g in range(group):
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(g * bq, bq)], o_ref.at[b, pl.ds(t0, bq), h * group + g])
    plgpu.wait_smem_to_gmem(0)


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
        "stages",
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
    stages: int | None = None,
) -> jax.Array:
    """Dense attention (semantics: ``pallas_kernels.reference.flash_attention``).

    q [B, Tq, N, H]; k, v [B, Tk, K, H]; segment_ids [B, Tq] (keys use ``segment_ids[:, -Tk:]``, so Tk <= Tq
    when given). H must be a multiple of 64. ``block_q`` (tokens), ``block_kv`` (keys) and ``stages`` override
    ``tuning.flash_blocks``.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = check_attention_args(
        num_heads, num_kv_heads, sliding_window, segment_ids=segment_ids, q_len=q_len, kv_len=kv_len
    )
    if head_dim % 64:
        raise ValueError(f"the Mosaic GPU kernel needs head_dim % 64 == 0, got {head_dim}")
    scale = head_dim**-0.5 if sm_scale is None else float(sm_scale)
    mm_dtype = common.mma_dtype(q.dtype)
    defaults = tuning.flash_blocks(q_len, kv_len, group, head_dim, jnp.dtype(q.dtype).itemsize)
    bq = block_q or defaults.q_tokens
    bk = block_kv or defaults.kv
    n_stages = stages or defaults.stages
    rows = group * bq
    if rows % 64 or bq % 8:
        raise ValueError(f"block_q={bq} with group={group}: rows must be a multiple of 64 and block_q of 8")
    if bk % 64 or bk > 256:
        raise ValueError(f"block_kv={bk} must be a multiple of 64, at most 256")
    q_pad, kv_pad = _round_up(q_len, bq), _round_up(kv_len, bk)
    num_q_blocks, num_kv_blocks = q_pad // bq, kv_pad // bk

    def pad_tokens(x, n):
        return jnp.pad(x.astype(mm_dtype), ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))

    operands = [pad_tokens(q, q_pad), pad_tokens(k, kv_pad), pad_tokens(v, kv_pad)]
    has_segments = segment_ids is not None
    if has_segments:
        seg = segment_ids.astype(jnp.int32)
        kv_seg = seg if kv_len == q_len else seg[:, -kv_len:]
        q_seg = jnp.pad(seg, ((0, 0), (0, q_pad - q_len)), constant_values=-1).reshape(batch, num_q_blocks, 1, bq)
        q_seg = jnp.broadcast_to(q_seg, (batch, num_q_blocks, group, bq)).reshape(batch, num_q_blocks, group * bq)
        operands += [q_seg, jnp.pad(kv_seg, ((0, 0), (0, kv_pad - kv_len)), constant_values=-2)]
    scratch = [
        compat.gpu_smem((rows, head_dim), mm_dtype),
        compat.gpu_smem((n_stages, bk, head_dim), mm_dtype),
        compat.gpu_smem((n_stages, bk, head_dim), mm_dtype),
    ]
    separate_out = jnp.dtype(q.dtype) != mm_dtype
    if separate_out:
        scratch.append(compat.gpu_smem((rows, head_dim), q.dtype))
    if has_segments:
        scratch += [plgpu.SMEM((rows,), jnp.int32), plgpu.SMEM((n_stages, bk), jnp.int32)]
    per_kv_copy = 2 if has_segments else 1
    scratch += [
        plgpu.Barrier(num_arrivals=group + (1 if has_segments else 0), num_barriers=1),
        plgpu.Barrier(num_arrivals=per_kv_copy, num_barriers=n_stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=n_stages),
    ]
    kernel = functools.partial(
        _kernel,
        sm_scale=scale,
        causal=causal,
        sliding_window=sliding_window,
        soft_cap=logit_soft_cap,
        has_segments=has_segments,
        group=group,
        bq=bq,
        bk=bk,
        stages=n_stages,
        offset=kv_len - q_len,
        kv_len=kv_len,
        num_kv_blocks=num_kv_blocks,
        mm_dtype=mm_dtype,
        separate_out=separate_out,
        interpret=bool(interpret),
    )
    call = compat.gpu_kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((batch, q_pad, num_heads, head_dim), q.dtype),
        grid=(num_q_blocks, num_kv_heads, batch),
        grid_names=("q", "h", "b"),
        interpret=bool(interpret),
        scratch_types=scratch,
    )
    return call(*operands)[:, :q_len]
