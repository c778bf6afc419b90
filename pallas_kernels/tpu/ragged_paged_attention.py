"""Ragged paged attention for TPU (Pallas Mosaic TPU): the engine's mixed prefill/decode step.

Work split
----------
The packed new tokens ``q [T, N, H]`` are cut into query blocks of ``bq`` consecutive tokens. The grid is ``(K
kv heads, T / bq query blocks, num_splits)``, all dimensions independent ("parallel"), so megacore chips share
the work without any cross-program state:

* one program owns one KV head and one query block. Its rows are the ``G = N / K`` query heads of that KV head
  for every token of the block, packed g-major as ``[G * bq, H]`` (the wrapper lays q out as ``[K, G, T,
  H]``). All G heads therefore share every K/V tile that is fetched (GQA packing): K/V bytes are read once per
  KV head, not once per query head, and the MXU sees ``G * bq`` rows instead of ``bq``.
* a query block may hold tokens of several sequences (decode tokens are one row each). The program walks the
  sequences that overlap its block (the first one comes from a small table computed in the wrapper), and for
  each walks only the KV blocks that some of its tokens can see: from the sliding-window start of its first
  token to its last token's position. Blocks outside that range are neither fetched nor computed. Rows of
  other sequences are masked; the online-softmax state (m, l, acc) of a row is only touched by its own
  sequence.
* K/V pages stay in HBM (``memory_space=ANY``). Each KV step DMAs ``pages_per_block`` pages, looked up through
  the scalar-prefetched block table, into a double buffer in VMEM. The program's (sequence, KV block) items
  form one flat list, so the copy of the next item, even the next sequence's first block, is in flight while
  the current one is computed (a decode block holds many one-token sequences).
* ``num_splits > 1`` (Flash-Decoding): split s handles the s-th slice of each sequence's KV range and writes a
  normalised partial output plus its log-sum-exp; the wrapper combines the splits. Used for decode batches too
  small to fill the chip.

Quantized KV (int8 / fp8): one float scale per (kv head, token slot), [K, P, L]. Each page's scale row travels
with the page by DMA into VMEM; the scales multiply the score columns (K) and the probability columns (V), so
the quantized tile itself is only converted, never rescaled.
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
from pallas_kernels.work_list import kv_work_list

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
EMPTY_LSE = -1e30  # log-sum-exp of a split that saw no key


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _kernel(
    # scalar prefetch (SMEM)
    kv_lens_ref,  # [S]
    block_tables_ref,  # [S * Pmax] (flattened)
    cu_q_lens_ref,  # [S + 1]
    num_seqs_ref,  # [1]
    first_seq_ref,  # [num_q_blocks]: first sequence overlapping each query block
    # inputs
    q_ref,  # [G, bq, H] block of [K, G, Tp, H]
    k_hbm,  # [K, P, L, H] (ANY)
    v_hbm,
    *rest,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    quantized: bool,
    num_splits: int,
    max_pages: int,
):
    if quantized:
        ks_hbm, vs_hbm, *rest = rest
    if num_splits > 1:
        o_ref, lse_ref, k_buf, v_buf, scale_buf, sems, m_ref, l_ref, acc_ref = rest
    else:
        o_ref, k_buf, v_buf, scale_buf, sems, m_ref, l_ref, acc_ref = rest
    group, bq, head_dim = q_ref.shape
    _, ppb, page_size, _ = k_buf.shape
    bkv = ppb * page_size
    rows = group * bq

    h = pl.program_id(0)
    qb = pl.program_id(1)
    split = pl.program_id(2)
    t0 = qb * bq
    t_end = t0 + bq

    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    q = q_ref[...].reshape(rows, head_dim)
    mm_dtype = q.dtype  # int8 K/V tiles are converted to the query dtype before the MXU
    # token index of each row ([rows, 1]); rows are g-major: row = g * bq + t
    row_tok = t0 + lax.broadcasted_iota(jnp.int32, (group, bq, 1), 1).reshape(rows, 1)
    num_seqs = num_seqs_ref[0]

    def page_copies(seq, blk, slot):
        npages = (kv_lens_ref[seq] + page_size - 1) // page_size
        copies = []
        for i in range(ppb):
            pidx = blk * ppb + i
            page = jnp.where(pidx < npages, block_tables_ref[seq * max_pages + jnp.minimum(pidx, max_pages - 1)], 0)
            copies.append(compat.tpu_async_copy(k_hbm.at[h, page], k_buf.at[slot, i], sems.at[slot, 0]))
            copies.append(compat.tpu_async_copy(v_hbm.at[h, page], v_buf.at[slot, i], sems.at[slot, 1]))
            if quantized:
                copies.append(compat.tpu_async_copy(ks_hbm.at[h, page], scale_buf.at[slot, 0, i], sems.at[slot, 2]))
                copies.append(compat.tpu_async_copy(vs_hbm.at[h, page], scale_buf.at[slot, 1, i], sems.at[slot, 3]))
        return copies

    def column_scales(slot, which):
        """[1, bkv] per-key scales (which: 0 = K, 1 = V): page i of the block covers columns i*L .. i*L+L-1."""
        return scale_buf[slot, which].reshape(1, bkv)

    def attend_block(blk, slot, row_pos, row_in_seq):
        k = k_buf[slot].reshape(bkv, head_dim)
        v = v_buf[slot].reshape(bkv, head_dim)
        if k.dtype != mm_dtype:
            k = k.astype(jnp.float32).astype(mm_dtype)
            v = v.astype(jnp.float32).astype(mm_dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * sm_scale
        if quantized:
            s = s * column_scales(slot, 0)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = blk * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
        mask = row_in_seq & (k_pos <= row_pos)
        if sliding_window is not None:
            mask = mask & (row_pos - k_pos < sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        if quantized:
            p = p * column_scales(slot, 1)
        pv = lax.dot_general(p.astype(mm_dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    seq_info, first_item, next_item = kv_work_list(
        cu_q_lens_ref=cu_q_lens_ref,
        kv_lens_ref=kv_lens_ref,
        num_seqs=num_seqs,
        t0=t0,
        t_end=t_end,
        block_kv=bkv,
        num_splits=num_splits,
        split=split,
        sliding_window=sliding_window,
    )

    # The program's work is a flat list of (sequence, KV block) items, so the DMA of the next item (possibly
    # the next sequence's first block) is in flight while the current one is computed.
    seq0, blk0 = first_item(first_seq_ref[qb])

    @pl.when(seq0 >= 0)
    def _():
        for c in page_copies(seq0, blk0, 0):
            c.start()

    def kv_step(carry):
        seq, blk, count = carry
        slot = count % 2
        nxt_seq, nxt_blk = next_item(seq, blk)

        @pl.when(nxt_seq >= 0)
        def _():
            for c in page_copies(nxt_seq, nxt_blk, 1 - slot):
                c.start()

        for c in page_copies(seq, blk, slot):
            c.wait()
        q_start, q_end, context = seq_info(seq)
        row_in_seq = (row_tok >= q_start) & (row_tok < q_end)
        attend_block(blk, slot, context + row_tok - q_start, row_in_seq)
        return nxt_seq, nxt_blk, count + 1

    lax.while_loop(lambda c: c[0] >= 0, kv_step, (seq0, blk0, jnp.int32(0)))

    denom = l_ref[...]
    inv = jnp.where(denom == 0.0, 0.0, 1.0 / jnp.where(denom == 0.0, 1.0, denom))
    out = (acc_ref[...] * inv).reshape(o_ref.shape)
    o_ref[...] = out.astype(o_ref.dtype)
    if num_splits > 1:
        lse = jnp.where(denom == 0.0, EMPTY_LSE, m_ref[...] + jnp.log(jnp.where(denom == 0.0, 1.0, denom)))
        lse_ref[...] = lse.reshape(lse_ref.shape)


def _combine_splits(out: jax.Array, lse: jax.Array) -> jax.Array:
    """out [K, NS, G, T, H], lse [K, NS, G, T, 1] -> [K, G, T, H] (weights exp(lse - max))."""
    top = jnp.max(lse, axis=1, keepdims=True)
    w = jnp.exp(lse - top)
    return jnp.sum(w * out, axis=1) / jnp.sum(w, axis=1)


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
) -> jax.Array:
    """Mixed-step attention (semantics: ``pallas_kernels.reference.ragged_paged_attention``).

    q [T, N, H]; k_pages, v_pages [K, P, L, H] (int8 / fp8 with ``k_scales``/``v_scales`` [K, P, L]); kv_lens [S];
    block_tables [S, Pmax]; cu_q_lens [S + 1] non-decreasing (entries past num_seqs repeat the total);
    num_seqs [1]. ``block_q`` / ``pages_per_block`` / ``num_splits`` override the tuning table.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_seqs, max_pages = block_tables.shape
    group = check_attention_args(num_heads, num_kv_heads, sliding_window, k_scales=k_scales, v_scales=v_scales)
    scale = head_dim**-0.5 if sm_scale is None else float(sm_scale)
    defaults = tuning.ragged_blocks(num_tokens, group, page_size, max_pages)
    bq = block_q or defaults.q_tokens
    ppb = min(pages_per_block or defaults.pages_per_block, max_pages)
    splits = num_splits or defaults.num_splits
    quantized = k_scales is not None

    padded = _round_up(max(num_tokens, 1), bq)
    num_q_blocks = padded // bq
    qt = jnp.pad(q, ((0, padded - num_tokens), (0, 0), (0, 0)))
    qt = qt.reshape(padded, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # [K, G, Tp, H]

    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_seqs = num_seqs.astype(jnp.int32).reshape(1)
    block_starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * bq
    first_seq = jnp.searchsorted(cu_q_lens[:-1], block_starts, side="right").astype(jnp.int32) - 1
    first_seq = jnp.clip(first_seq, 0, max_seqs - 1)
    scalars = (kv_lens, block_tables.astype(jnp.int32).reshape(-1), cu_q_lens, num_seqs, first_seq)

    q_spec = pl.BlockSpec((None, group, bq, head_dim), lambda h, i, s, *_: (h, 0, i, 0))
    in_specs = [q_spec, pl.BlockSpec(memory_space=compat.ANY), pl.BlockSpec(memory_space=compat.ANY)]
    operands = [qt, k_pages, v_pages]
    if quantized:
        in_specs += [pl.BlockSpec(memory_space=compat.ANY), pl.BlockSpec(memory_space=compat.ANY)]
        operands += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    if splits > 1:
        out_shape = (
            jax.ShapeDtypeStruct((num_kv_heads, splits, group, padded, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_kv_heads, splits, group, padded, 1), jnp.float32),
        )
        out_specs = (
            pl.BlockSpec((None, None, group, bq, head_dim), lambda h, i, s, *_: (h, s, 0, i, 0)),
            pl.BlockSpec((None, None, group, bq, 1), lambda h, i, s, *_: (h, s, 0, i, 0)),
        )
    else:
        out_shape = jax.ShapeDtypeStruct((num_kv_heads, group, padded, head_dim), q.dtype)
        out_specs = q_spec
    rows = group * bq
    scratch = [
        compat.TPU_VMEM((2, ppb, page_size, head_dim), k_pages.dtype),
        compat.TPU_VMEM((2, ppb, page_size, head_dim), v_pages.dtype),
        compat.TPU_VMEM((2, 2, ppb, page_size), jnp.float32),
        compat.tpu_dma_semaphores((2, 4)),
        compat.TPU_VMEM((rows, 1), jnp.float32),
        compat.TPU_VMEM((rows, 1), jnp.float32),
        compat.TPU_VMEM((rows, head_dim), jnp.float32),
    ]
    kernel = functools.partial(
        _kernel,
        sm_scale=scale,
        sliding_window=sliding_window,
        soft_cap=logit_soft_cap,
        quantized=quantized,
        num_splits=splits,
        max_pages=max_pages,
    )
    result = pl.pallas_call(
        kernel,
        grid_spec=pltpu_grid_spec(len(scalars), (num_kv_heads, num_q_blocks, splits), in_specs, out_specs, scratch),
        out_shape=out_shape,
        compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "parallel")),
        interpret=compat.tpu_interpret(interpret),
        name="jserve_ragged_paged_attention",
    )(*scalars, *operands)
    if splits > 1:
        result = _combine_splits(*result).astype(q.dtype)
    out = result.transpose(2, 0, 1, 3).reshape(padded, num_heads, head_dim)
    return out[:num_tokens]


def pltpu_grid_spec(num_scalars, grid, in_specs, out_specs, scratch):
    return compat.pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_scalars,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
