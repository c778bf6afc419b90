"""Ragged paged attention for NVIDIA Hopper (Pallas Mosaic GPU): the engine's mixed prefill/decode step.

Work split
----------
Grid ``(T / bq query blocks, K kv heads, num_splits)``, one warpgroup per program (CTA):

* a program owns ``bq`` consecutive packed tokens and one KV head. Its ``M = G * bq`` query rows are the G
  query heads of that KV head for each token, g-major (row ``g * bq + t``), loaded by G TMA copies of ``[bq,
  H]`` slices of q. ``M`` is a multiple of 64, the ``wgmma`` tile height, so every K/V tile fetched serves all
  G heads (GQA packing) and fills the tensor cores.
* the tokens of a block may belong to several sequences. The program walks those sequences (the first comes
  from a small table made in the wrapper) and for each streams only the KV blocks some of its tokens can see
  (from the sliding-window start of its first token to its last token's position); other rows are masked.
* a KV step is ``bk = pages_per_block * page_size`` keys: one TMA copy per page, looked up in the block table
  (read from GMEM as scalars), lands in a ``stages``-deep ring of SMEM buffers. The program's work is one flat
  list of (sequence, KV block) items; a producer cursor runs ``stages`` items ahead of the consumer, so the
  copies for the next sequence are already in flight while the current one finishes (decode blocks hold many
  short sequences) and TMA traffic overlaps the two ``wgmma`` products and the softmax.
* ``num_splits > 1`` (Flash-Decoding): split s takes the s-th slice of every sequence's KV range and writes a
  normalised float32 partial output plus its log-sum-exp; the wrapper merges the splits. The default
  (``tuning.paged_blocks``) splits whenever the step's query blocks alone give fewer than ~2 programs per SM,
  so a decode step of a few long sequences still occupies every SM; large prefill steps are not split.

K/V tiles in a dtype ``wgmma`` cannot take (int8 pages, fp32 pages) are TMA'd into staging buffers and
converted to bf16 in SMEM. Quantized pages (int8 / fp8) carry one scale per (kv head, token slot) [K, P, L]: each
page's scale row is TMA'd next to the page (same barrier) and multiplies the score columns (K) and the
probability columns (V), so the quantized tile is only converted, never rescaled.
fp32 queries are rounded to bf16 for the MMAs (accumulation stays fp32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.checks import GPU_MIN_COPY_BYTES, GPU_MIN_QUANTIZED_PAGE_SIZE, check_attention_args
from pallas_kernels.compat import pl, plgpu
from pallas_kernels.gpu import common, tuning
from pallas_kernels.work_list import kv_work_list


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _kernel(
    kv_lens_ref,
    block_tables_ref,
    cu_q_lens_ref,
    num_seqs_ref,
    first_seq_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    sm_scale,
    sliding_window,
    soft_cap,
    quantized,
    convert,
    num_splits,
    group,
    bq,
    ppb,
    page_size,
    stages,
    mm_dtype,
    separate_out,
    interpret,
):
    refs = list(refs)
    ks_ref = vs_ref = None
    if quantized:
        ks_ref, vs_ref = refs.pop(0), refs.pop(0)
    o_ref = refs.pop(0)
    lse_ref = refs.pop(0) if num_splits > 1 else None
    q_smem, k_smem, v_smem = refs[:3]
    refs = refs[3:]
    o_smem = refs.pop(0) if separate_out else q_smem  # q's tile is free once the last sequence is done
    lse_smem = refs.pop(0) if num_splits > 1 else None
    ks_smem = vs_smem = None
    if quantized:
        ks_smem, vs_smem = refs.pop(0), refs.pop(0)
    if convert:
        k_raw, v_raw = refs.pop(0), refs.pop(0)
    q_bar, k_bars, v_bars = refs

    qi = lax.axis_index("q")
    h = lax.axis_index("h")
    split = lax.axis_index("split") if num_splits > 1 else 0
    rows, head_dim = q_smem.shape
    bk = ppb * page_size
    max_pages = block_tables_ref.shape[1]
    t0 = qi * bq
    t_end = t0 + bq

    for g in range(group):
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t0, bq), h * group + g], q_smem.at[pl.ds(g * bq, bq)], q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[0])

    row = compat.gpu_iota((rows, bk), 0, interpret)
    col = compat.gpu_iota((rows, bk), 1, interpret)
    row_tok = t0 + lax.rem(row, bq)
    num_seqs = num_seqs_ref[0]
    k_dst = k_raw if convert else k_smem
    v_dst = v_raw if convert else v_smem

    def page_of(seq, blk, i):
        npages = (kv_lens_ref[seq] + page_size - 1) // page_size
        pidx = blk * ppb + i
        return jnp.where(pidx < npages, block_tables_ref[seq, jnp.minimum(pidx, max_pages - 1)], 0)

    def issue(seq, blk, slot):
        for i in range(ppb):
            page = page_of(seq, blk, i)
            rows_i = pl.ds(i * page_size, page_size)
            plgpu.copy_gmem_to_smem(k_ref.at[h, page], k_dst.at[slot, rows_i], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[h, page], v_dst.at[slot, rows_i], v_bars.at[slot])
            if quantized:
                plgpu.copy_gmem_to_smem(ks_ref.at[h, page], ks_smem.at[slot, rows_i], k_bars.at[slot])
                plgpu.copy_gmem_to_smem(vs_ref.at[h, page], vs_smem.at[slot, rows_i], v_bars.at[slot])

    def column_scales(scales_smem, slot):
        """[rows, bk]: each key column's scale, broadcast down the rows of the WGMMA accumulator."""
        vec = compat.gpu_load(scales_smem.at[slot], "WGMMA", interpret, reduced_dim=0)
        return lax.broadcast_in_dim(vec, (rows, bk), [1])

    seq_info, first_item, next_item = kv_work_list(
        cu_q_lens_ref=cu_q_lens_ref,
        kv_lens_ref=kv_lens_ref,
        num_seqs=num_seqs,
        t0=t0,
        t_end=t_end,
        block_kv=bk,
        num_splits=num_splits,
        split=split,
        sliding_window=sliding_window,
    )

    # The work of this program is a flat list of (sequence, KV block) items. The producer cursor runs
    # ``stages`` items ahead of the consumer, so the TMA ring stays full across sequence boundaries too.
    seq0, blk0 = first_item(first_seq_ref[qi])
    producer = (seq0, blk0)
    for st in range(stages):

        @pl.when(producer[0] >= 0)
        def _(p=producer, st=st):
            issue(p[0], p[1], st)

        producer = lax.cond(producer[0] >= 0, lambda p=producer: next_item(*p), lambda p=producer: p)

    def kv_step(carry):
        seq, blk, p_seq, p_blk, count, *state = carry
        slot = lax.rem(count, stages)
        q_start, q_end, context = seq_info(seq)
        in_seq = (row_tok >= q_start) & (row_tok < q_end)
        row_pos = context + row_tok - q_start
        plgpu.barrier_wait(k_bars.at[slot])
        if convert:
            k_smem[slot] = k_raw[slot].astype(jnp.float32).astype(mm_dtype)
            plgpu.commit_smem()
        raw = common.qk_scores(q_smem, k_smem.at[slot], interpret)
        if quantized:  # real q.k first: the soft cap's tanh must see dequantized scores
            raw = raw * column_scales(ks_smem, slot)
        s2 = common.scale_scores(raw, sm_scale, soft_cap)
        k_pos = blk * bk + col
        mask = in_seq & (k_pos <= row_pos)
        if sliding_window is not None:
            mask = mask & (row_pos - k_pos < sliding_window)
        plgpu.barrier_wait(v_bars.at[slot])
        if convert:
            v_smem[slot] = v_raw[slot].astype(jnp.float32).astype(mm_dtype)
            plgpu.commit_smem()
        p_scale = column_scales(vs_smem, slot) if quantized else None
        state = common.softmax_step(s2, mask, tuple(state), v_smem.at[slot], mm_dtype, interpret, p_scale)

        @pl.when(p_seq >= 0)
        def _():
            issue(p_seq, p_blk, slot)

        p_seq, p_blk = lax.cond(p_seq >= 0, lambda: next_item(p_seq, p_blk), lambda: (p_seq, p_blk))
        seq, blk = next_item(seq, blk)
        return (seq, blk, p_seq, p_blk, count + 1, *state)

    init = (seq0, blk0, *producer, jnp.int32(0), *common.init_state(rows, head_dim, interpret))
    _, _, _, _, _, *state = lax.while_loop(lambda c: c[0] >= 0, kv_step, init)
    out, lse = common.finish(state)

    o_smem[...] = out.astype(o_smem.dtype)
    if num_splits > 1:
        lse_smem[...] = lse
    plgpu.commit_smem()
    for g in range(group):
        rows_g = pl.ds(g * bq, bq)
        if num_splits > 1:
            plgpu.copy_smem_to_gmem(o_smem.at[rows_g], o_ref.at[split, pl.ds(t0, bq), h * group + g])
            plgpu.copy_smem_to_gmem(lse_smem.at[rows_g], lse_ref.at[split, h * group + g, pl.ds(t0, bq)])
        else:
            plgpu.copy_smem_to_gmem(o_smem.at[rows_g], o_ref.at[pl.ds(t0, bq), h * group + g])
    plgpu.wait_smem_to_gmem(0)


def _combine_splits(out: jax.Array, lse: jax.Array) -> jax.Array:
    """out [NS, T, N, H] f32, lse [NS, N, T] -> [T, N, H]."""
    lse = jnp.swapaxes(lse, 1, 2)[..., None]  # [NS, T, N, 1]
    w = jnp.exp(lse - jnp.max(lse, axis=0, keepdims=True))
    return jnp.sum(w * out, axis=0) / jnp.sum(w, axis=0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "logit_soft_cap",
        "interpret",
        "block_q",
        "pages_per_block",
        "num_splits",
        "stages",
    ),
)
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    logit_soft_cap: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    stages: int | None = None,
) -> jax.Array:
    """Mixed-step attention (semantics: ``pallas_kernels.reference.ragged_paged_attention``).

    q [T, N, H]; k_pages, v_pages [K, P, L, H] (int8 / fp8 with ``k_scales``/``v_scales`` [K, P, L]); kv_lens [S];
    block_tables [S, Pmax]; cu_q_lens [S + 1] non-decreasing (entries past num_seqs repeat the total);
    num_seqs [1]. H must be a multiple of 64 and L a multiple of 8. ``block_q`` / ``pages_per_block`` /
    ``num_splits`` / ``stages`` override ``tuning.paged_blocks``.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, max_pages = block_tables.shape
    group = check_attention_args(num_heads, num_kv_heads, sliding_window, k_scales=k_scales, v_scales=v_scales)
    if head_dim % 64 or page_size % 8:
        raise ValueError(
            f"the Mosaic GPU kernel needs head_dim % 64 == 0 and page_size % 8 == 0, got {head_dim}, {page_size}"
        )
    scale = head_dim**-0.5 if sm_scale is None else float(sm_scale)
    mm_dtype = common.mma_dtype(q.dtype)
    convert = jnp.dtype(k_pages.dtype) != mm_dtype
    defaults = tuning.paged_blocks(
        group,
        page_size,
        head_dim,
        jnp.dtype(k_pages.dtype).itemsize,
        num_tokens=num_tokens,
        num_kv_heads=num_kv_heads,
        max_pages_per_seq=max_pages,
    )
    bq = block_q or defaults.q_tokens
    ppb = pages_per_block or max(1, defaults.kv // page_size)
    splits = num_splits or defaults.num_splits
    n_stages = stages or defaults.stages
    rows = group * bq
    if rows % 64 or bq % 8:
        raise ValueError(f"block_q={bq} with group={group}: rows must be a multiple of 64 and block_q of 8")
    bk = ppb * page_size
    if bk % 64 or bk > 256:
        raise ValueError(f"keys per step ({ppb} pages x {page_size}) must be a multiple of 64, at most 256")
    quantized = k_scales is not None
    if quantized and page_size < GPU_MIN_QUANTIZED_PAGE_SIZE:
        raise ValueError(
            f"int8 / fp8 pages need page_size >= {GPU_MIN_QUANTIZED_PAGE_SIZE} in the Mosaic GPU kernel (each "
            f"page's float32 scale row moves by one TMA copy of at least {GPU_MIN_COPY_BYTES} bytes), got {page_size}"
        )

    padded = _round_up(max(num_tokens, 1), bq)
    num_q_blocks = padded // bq
    qp = jnp.pad(q.astype(mm_dtype), ((0, padded - num_tokens), (0, 0), (0, 0)))
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    block_starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * bq
    first_seq = jnp.searchsorted(cu_q_lens[:-1], block_starts, side="right").astype(jnp.int32) - 1
    first_seq = jnp.clip(first_seq, 0, max_seqs - 1)
    operands = [
        kv_lens.astype(jnp.int32),
        block_tables.astype(jnp.int32),
        cu_q_lens,
        num_seqs.astype(jnp.int32).reshape(1),
        first_seq,
        qp,
        k_pages,
        v_pages,
    ]
    if quantized:
        operands += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]

    out_dtype = jnp.float32 if splits > 1 else q.dtype
    if splits > 1:
        out_type = (
            jax.ShapeDtypeStruct((splits, padded, num_heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_heads, padded), jnp.float32),
        )
    else:
        out_type = jax.ShapeDtypeStruct((padded, num_heads, head_dim), q.dtype)
    scratch = [
        compat.gpu_smem((rows, head_dim), mm_dtype),
        compat.gpu_smem((n_stages, bk, head_dim), mm_dtype),
        compat.gpu_smem((n_stages, bk, head_dim), mm_dtype),
    ]
    separate_out = jnp.dtype(out_dtype) != mm_dtype
    if separate_out:
        scratch.append(compat.gpu_smem((rows, head_dim), out_dtype))
    if splits > 1:
        scratch.append(plgpu.SMEM((rows,), jnp.float32))
    if quantized:
        scratch += [plgpu.SMEM((n_stages, bk), jnp.float32), plgpu.SMEM((n_stages, bk), jnp.float32)]
    if convert:
        scratch += [
            compat.gpu_smem((n_stages, bk, head_dim), k_pages.dtype),
            compat.gpu_smem((n_stages, bk, head_dim), v_pages.dtype),
        ]
    copies_per_step = 2 * ppb if quantized else ppb  # each page's copy, and its scale row's
    scratch += [
        plgpu.Barrier(num_arrivals=group, num_barriers=1),
        plgpu.Barrier(num_arrivals=copies_per_step, num_barriers=n_stages),
        plgpu.Barrier(num_arrivals=copies_per_step, num_barriers=n_stages),
    ]
    kernel = functools.partial(
        _kernel,
        sm_scale=scale,
        sliding_window=sliding_window,
        soft_cap=logit_soft_cap,
        quantized=quantized,
        convert=convert,
        num_splits=splits,
        group=group,
        bq=bq,
        ppb=ppb,
        page_size=page_size,
        stages=n_stages,
        mm_dtype=mm_dtype,
        separate_out=separate_out,
        interpret=bool(interpret),
    )
    grid, names = (num_q_blocks, num_kv_heads), ("q", "h")
    if splits > 1:
        grid, names = grid + (splits,), names + ("split",)
    call = compat.gpu_kernel(
        kernel,
        out_type=out_type,
        grid=grid,
        grid_names=names,
        interpret=bool(interpret),
        scratch_types=scratch,
    )
    result = call(*operands)
    if splits > 1:
        result = _combine_splits(*result).astype(q.dtype)
    return result[:num_tokens]
