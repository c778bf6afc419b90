"""Ragged paged attention in plain XLA ops over host-planned "work items": no padding to the longest context.

``xla.ragged_paged_attention`` walks the context in 64-key steps for EVERY token row: a decode row with a
short context pays for the longest one in the batch, padding rows pay too, and the tokens of one prefill chunk
each gather the same pages again. Here the host (``plan_work``, numpy, ~0.1 ms) cuts the step into items:

* each sequence's new tokens are cut into query blocks: one row per block for single-token (decode)
  sequences, ``q_block`` consecutive rows for the others (two groups, each with its own static block size,
  so a mixed step pays no 16-row padding for its decodes);
* an item = (block, run of ``pages_per_item`` consecutive pages) that some row of the block can see; pages
  in the causal future of the whole block, past kv_len, or before the sliding window of its first row get
  no item;
* W (items) and NB (blocks) per group are padded to buckets; padding items point at null page 0 with their
  keys at position 2**30, so they are masked for every row.

Then, per group, all shapes static: gather each item's pages once ([K, W, R*L, H], K/V never repeated for GQA)
and its block's queries ([K, W, G*Q, H]); scores per item as one batched matmul, masked per (row, key) by
position; a per-block softmax across the block's items by scatter-max of the item maxima into block space,
exp against the block max, scatter-add of the item sums and of P.V into block space (fp32); divide, then a
gather puts block slots back onto token rows (padding rows read a zero row). A group whose working set
exceeds ``chunk_bytes`` runs as a fori_loop over item chunks with the same merge done online (running block
max, sum and output rescaled per chunk), stopping after the last chunk holding real items.

Why it is faster: work is proportional to the pages each block really sees (sum of contexts, not rows x max
context), and a prefill block of 16 rows gathers each page once instead of 16 times. What it cannot avoid on
CPU: XLA's gathers cost about 0.35 ns per element whatever the dtype, and the tiny batched matmuls of decode
(G*Q = G rows) are memory-bound, so decode stays gather-bound and gains only what raggedness saves.

Measured (2-core shared CPU, jit, float32, min of 30 interleaved calls (6 for the large ones); absolute
numbers moved by up to ~1.5x between runs with the other agents' load, ratios less; "plan" = plan_work host
time; "+plan" = plan_work + host-to-device transfer of the plan + kernel; planning and transfer are
paid once per step for all layers; plan_work for 256 sequences with contexts up to 2k: 0.3-0.4 ms):

  case (K, G, H, L = 4, 2, 32, 16 unless said)                page loop  items      plan    +plan   speedup
  (a) decode, 64 seqs, kv 20..190                             1.7-2.5 ms 1.4-1.75   0.10 ms 1.8 ms  1.1-1.6x
  (b) prefill, 7 seqs x 73 new tokens (T=512), cached 0..32   16-40 ms   2.0-3.0    0.10 ms 2.5 ms  7-10x
  (c) mixed, 30 decodes (kv 80..120) + 3 chunks of 160        30-45 ms   3.3-5.0    0.12 ms 4.0 ms  7-9x
  (d) decode, K=8 G=4 H=128, 16 seqs x ~2k context             66-73 ms   58-62      0.11 ms 59 ms   1.15x
  decode, 64 seqs, all kv = 128 (no raggedness)               1.2-1.9 ms 1.5-1.7                    0.75-1.0x
  decode, 1 seq, kv 100                                       0.11 ms    0.10       0.08 ms 0.28 ms ~1x
  prefill, 1 seq, 512 new tokens after 2048 cached            236-350 ms 37-60                      6x
  (b) with q_block=1 instead of 16                                       6.0                        3.8x
  bf16 caches: (a) 4.0 -> 2.9 ms, (b) 36 -> 5.6 ms, (c) 38 -> 10 ms (bf16 is slower than f32 here, both)

Choices measured: q_block 16 vs 8 / 32 within noise for (b), (c); q_block 1 is 2.5-4x worse for prefill, so
``choose_q_block`` returns 1 for decode-only steps and 16 otherwise. Items of 32 keys for decode blocks and 64
keys for q_block blocks (``pages_per_item`` default ``(32 // L, 64 // L)``) beat 16-key items by ~1.2-1.5x
(fewer, larger batched matmuls) and 64-key decode items (padding inside the run). Scatter merges beat one-hot
matmul merges; a 16-row chunk group with small heads prefers one shot, big heads a loop (``chunk_bytes``).
Default power-of-two buckets cost the padding items' full price when a group runs in one shot; pass finer
``item_buckets`` (e.g. multiples of 8 or 1.25x steps) if variants are cheap to compile.

Where the page loop is as fast or faster: decode-only steps with near-uniform contexts (no padding to save;
the item bookkeeping costs ~1.3x per key with small heads) and tiny batches where the ~0.2 ms of planning +
plan transfer dominates. ``prefer_items`` encodes the rule: items for any step with a multi-token
sequence; for decode-only steps, items when they touch <= 3/4 of the keys the page loop would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import pages_to_float32

_NEG = -1e30  # masked score; exp(_NEG - m) == 0 for any finite row max m
_FAR = 1 << 30  # first key position of a padding item: past every query, so all its keys are masked
CHUNK_BYTES = 8 << 20  # per-chunk working set (gathered K/V tiles, scores, partial outputs) before looping
DECODE_ITEM_KEYS = 32  # default keys per item of one-row blocks (pages_per_item = this // page_size)
CHUNK_ITEM_KEYS = 64  # ... and of q_block-row blocks


@dataclasses.dataclass(frozen=True)
class ItemSet:
    """One group of items sharing a query-block size Q (all int32; numpy on the host, arrays inside jit).

    W items (bucketed), each R consecutive pages of one block; NB blocks (bucketed) of Q query rows.
    """

    item_pages: np.ndarray  # [W, R] physical pages; past the block's last visible page, and padding: 0
    item_block: np.ndarray  # [W] block of each item, non-decreasing; padding items: NB - 1
    item_kpos: np.ndarray  # [W] position of the item's first key; padding items: 2**30 (everything masked)
    num_items: np.ndarray  # [1] real items (the chunked loop stops there)
    block_rows: np.ndarray  # [NB, Q] token row of each query slot; padding slots: row 0
    block_qpos: np.ndarray  # [NB, Q] position of each query slot; padding slots: -1 (sees no key)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(W, R, NB, Q)."""
        return (*self.item_pages.shape, *self.block_rows.shape)


jax.tree_util.register_dataclass(ItemSet, data_fields=[f.name for f in dataclasses.fields(ItemSet)], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class WorkPlan:
    """The host-side split of one ragged step. ``decode``: blocks of one token (q_len == 1 sequences, or every
    sequence when q_block == 1); ``chunks``: the other sequences' tokens in blocks of q_block. A group with no
    items has W == NB == 0 and costs nothing. ``token_slot[t]`` indexes the concatenation of both groups'
    block slots (decode first); padding rows point one past the end and read zeros."""

    decode: ItemSet
    chunks: ItemSet
    token_slot: np.ndarray  # [T]
    page_size: int = 0  # static (part of the jit cache key), checked against the pages
    sliding_window: int | None = None  # static; the window pages were skipped for, if any

    @property
    def q_block(self) -> int:
        return self.chunks.block_rows.shape[1]


jax.tree_util.register_dataclass(
    WorkPlan, data_fields=["decode", "chunks", "token_slot"], meta_fields=["page_size", "sliding_window"]
)


def _bucket(n: int, buckets: Sequence[int] | None, minimum: int) -> int:
    """0 for nothing; else the smallest bucket >= n, by default (or past the last bucket) a power of two."""
    if n == 0:
        return 0
    if buckets is not None:
        fits = [b for b in buckets if b >= n]
        if fits:
            return int(min(fits))
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def _plan_group(
    seqs, cu, q_lens, kv, tables, q_block, pages_per_item, page_size, window, item_buckets, block_buckets, fixed
):
    """Items of sequences ``seqs`` cut into blocks of q_block tokens -> (ItemSet, first block of each).

    ``fixed`` = (W, NB): pad to exactly these sizes (ValueError if the step needs more) instead of buckets."""
    qb, r = q_block, pages_per_item
    ql = q_lens[seqs]
    nblk = -(-ql // qb)
    blk_end = np.cumsum(nblk)
    nb = int(blk_end[-1]) if len(seqs) else 0
    blk_start = blk_end - nblk
    blk_local = np.repeat(np.arange(len(seqs)), nblk)
    blk_seq = seqs[blk_local]
    j = (np.arange(nb) - blk_start[blk_local]) * qb  # first token of the block within its sequence
    nrows = np.minimum(qb, q_lens[blk_seq] - j)
    row0 = cu[blk_seq] + j
    qpos0 = kv[blk_seq] - q_lens[blk_seq] + j
    # Pages some row of the block can see: from the window start of its first row to the page of its last row.
    last_page = np.minimum((qpos0 + nrows - 1) // page_size, tables.shape[1] - 1)
    first_page = np.zeros(nb, np.int64) if window is None else np.maximum(qpos0 - window + 1, 0) // page_size
    nruns = np.maximum(-(-(last_page - first_page + 1) // r), 0)
    item_end = np.cumsum(nruns)
    w = int(item_end[-1]) if nb else 0
    item_blk = np.repeat(np.arange(nb), nruns)
    pidx0 = (np.arange(w) - (item_end - nruns)[item_blk]) * r + first_page[item_blk]

    if fixed is not None:
        W, NB = fixed
        if w > W or nb > NB:
            raise ValueError(f"work plan needs {w} items / {nb} blocks; the fixed plan holds {W} / {NB}")
    else:
        W = _bucket(w, item_buckets, 8)
        NB = _bucket(nb, block_buckets, 1) if w else 0
    pidx = pidx0[:, None] + np.arange(r)
    used = pidx <= last_page[item_blk][:, None]
    item_pages = np.zeros((W, r), np.int32)
    item_pages[:w] = np.where(used, tables[blk_seq[item_blk][:, None], np.minimum(pidx, tables.shape[1] - 1)], 0)
    item_block = np.full(W, NB - 1, np.int32)
    item_block[:w] = item_blk
    item_kpos = np.full(W, _FAR, np.int32)
    item_kpos[:w] = pidx0 * page_size
    slot = np.arange(qb)
    valid = slot[None, :] < nrows[:, None]
    block_rows = np.zeros((NB, qb), np.int32)
    block_qpos = np.full((NB, qb), -1, np.int32)
    if NB:
        block_rows[:nb] = np.where(valid, row0[:, None] + slot, 0)
        block_qpos[:nb] = np.where(valid, qpos0[:, None] + slot, -1)
    group = ItemSet(item_pages, item_block, item_kpos, np.array([w], np.int32), block_rows, block_qpos)
    return group, blk_start


def plan_work(
    kv_lens,
    cu_q_lens,
    num_seqs,
    block_tables,
    *,
    page_size: int,
    num_tokens: int,
    q_block: int,
    sliding_window: int | None = None,
    item_buckets: Sequence[int] | None = None,
    block_buckets: Sequence[int] | None = None,
    pages_per_item: int | tuple[int, int] | None = None,
    fixed_sizes: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> WorkPlan:
    """Split one ragged step into (query block, page run) items; numpy only, vectorised (no per-token loops).

    Arguments are the kernel contract's kv_lens [S], cu_q_lens [S+1], num_seqs [1] (or an int) and
    block_tables [S, Pmax] (host arrays), ``num_tokens`` = T (rows of q, padding included). Single-token
    sequences get blocks of one row; the others blocks of ``q_block`` rows. An item covers ``pages_per_item``
    consecutive pages (an int, or (one-row blocks, q_block blocks); default 32 and 64 keys' worth); pages in
    the causal future of the whole block, past kv_len, or (with ``sliding_window``) before the window of its
    first row are skipped.
    Item and block counts of each group are padded to the next of ``item_buckets`` / ``block_buckets``
    (default: powers of two, items >= 8); one compiled kernel per distinct (W, NB) pair of both groups.
    ``fixed_sizes`` = ((W, NB) of the one-row group, (W, NB) of the q_block group) pads to exactly those
    sizes instead (see ``fixed_plan_sizes``), so every step of a token bucket has one shape.
    """
    n = int(np.asarray(num_seqs).reshape(-1)[0])
    cu = np.asarray(cu_q_lens, np.int64)[: n + 1]
    kv = np.asarray(kv_lens, np.int64)[:n]
    tables = np.asarray(block_tables)
    q_lens = np.diff(cu)
    if pages_per_item is None:
        pages_per_item = (max(1, DECODE_ITEM_KEYS // page_size), max(1, CHUNK_ITEM_KEYS // page_size))
    elif isinstance(pages_per_item, int):
        pages_per_item = (pages_per_item, pages_per_item)
    one_row = q_lens <= 1 if q_block > 1 else np.ones(n, bool)
    groups, starts = [], []
    fixed = fixed_sizes or (None, None)
    for seqs, qb, r, fix in (
        (np.flatnonzero(one_row), 1, pages_per_item[0], fixed[0]),
        (np.flatnonzero(~one_row), int(q_block), pages_per_item[1], fixed[1]),
    ):
        group, start = _plan_group(
            seqs, cu, q_lens, kv, tables, qb, int(r), page_size, sliding_window, item_buckets, block_buckets, fix
        )
        groups.append((seqs, group, qb))
        starts.append(start)
    token_slot = np.empty(num_tokens, np.int32)
    offset = 0
    for (seqs, group, qb), start in zip(groups, starts, strict=True):
        ql = q_lens[seqs]
        tok = np.repeat(np.arange(len(seqs)), ql)
        jt = np.arange(len(tok)) - (np.cumsum(ql) - ql)[tok]
        token_slot[cu[seqs][tok] + jt] = offset + (start[tok] + jt // qb) * qb + jt % qb
        offset += group.block_rows.size
    token_slot[int(cu[-1]) if n else 0 :] = offset
    return WorkPlan(groups[0][1], groups[1][1], token_slot, page_size=int(page_size), sliding_window=sliding_window)


def fixed_plan_sizes(
    num_tokens: int, max_num_seqs: int, max_pages_per_seq: int, page_size: int, q_block: int = 16
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(W, NB) per group that hold every step of ``num_tokens`` rows (``plan_work(fixed_sizes=...)``).

    One-row blocks: at most one per sequence row; q_block blocks: ceil(q / q_block) per multi-token sequence,
    at most num_tokens // q_block + (number of such sequences) in all. Each block has at most
    ceil(Pmax / pages_per_item) items. W is rounded up to a power of two so the kernel's item chunks divide it.
    The kernel loops only over chunks holding real items, so the padding costs host memory, not device time.
    """
    r_one = max(1, DECODE_ITEM_KEYS // page_size)
    r_blk = max(1, CHUNK_ITEM_KEYS // page_size)
    nb_one = min(max_num_seqs, num_tokens)
    nb_blk = num_tokens // q_block + min(max_num_seqs, num_tokens // 2)

    def items(nb: int, r: int) -> int:
        return 1 << max(3, (nb * -(-max_pages_per_seq // r) - 1).bit_length())

    return (items(nb_one, r_one), nb_one), (items(nb_blk, r_blk), max(nb_blk, 1))


def choose_q_block(q_lens) -> int:
    """Query block for a step's multi-token sequences: 1 when no sequence has more than one new token (pure
    decode: the plan then has one group and no wasted rows), else 16. Single-token sequences always get blocks
    of one row whatever this returns, so a mixed step pays no padding for its decodes."""
    q_lens = np.asarray(q_lens)
    return 1 if q_lens.size == 0 or int(q_lens.max()) <= 1 else 16


def prefer_items(q_lens, kv_lens, *, num_tokens: int | None = None, page_size: int = 16) -> bool:
    """Per-step choice between this kernel and ``xla.ragged_paged_attention`` (the 64-key page loop).

    Any multi-token sequence (prefill / mixed step): items (6-10x faster measured). Decode-only steps: items
    when they touch at most 3/4 of the keys the page loop would (it runs every token row, padding rows
    included, to the longest context in 64-key steps), i.e. when contexts are ragged enough to pay for the
    item bookkeeping (about 1.3x the page loop's cost per key with small heads, measured); with near-uniform
    contexts or a handful of sequences the page loop is as fast or faster (at one or two sequences it always is:
    the items' fixed cost per call, ~5 ms on the 2-core CPU for the bundled model's four layers, dominates).
    """
    q_lens = np.asarray(q_lens)
    kv_lens = np.asarray(kv_lens)[: q_lens.size]
    if q_lens.size == 0:
        return False
    if int(q_lens.max()) > 1:
        return True
    if q_lens.size <= 2:  # one or two sequences: the items' fixed cost dominates (page loop 1.1-1.6x faster)
        return False
    item_keys = max(1, DECODE_ITEM_KEYS // page_size) * page_size
    items_work = int(np.sum(-(-kv_lens // item_keys) * item_keys))
    rows = q_lens.size if num_tokens is None else num_tokens
    loop_work = rows * int(-(-kv_lens.max() // 64) * 64)
    return 4 * items_work <= 3 * loop_work


def _attend_group(qf, k_pages, v_pages, g: ItemSet, *, sliding_window, k_scales, v_scales, logit_soft_cap, chunk_bytes):
    """Normalised outputs of every block slot of group ``g`` -> [NB * Q, N, H] float32."""
    num_kv, _, page_size, head_dim = k_pages.shape
    num_heads = qf.shape[1]
    group = num_heads // num_kv
    W, R, NB, Q = g.shape
    keys = R * page_size
    rows = group * Q
    per_item = 4 * num_kv * (2 * keys * head_dim + 2 * rows * keys + rows * head_dim)
    C = W
    while C > 8 and C % 2 == 0 and C * per_item > chunk_bytes:
        C //= 2
    # Queries per block: [K, NB, G, Q, H]; an item picks its block's [G * Q, H] slab.
    qb = qf[g.block_rows].reshape(NB, Q, num_kv, group, head_dim).transpose(2, 0, 3, 1, 4)
    offsets = jnp.arange(keys)

    def chunk(c, carry):  # online softmax over item chunks, merged per block
        run_max, run_sum, run_acc = carry  # [K, NB, G, Q], [K, NB, G, Q], [K, NB, G, Q, H]
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, c * C, C, 0)
        pages, blk, kpos = take(g.item_pages), take(g.item_block), take(g.item_kpos)
        q = qb[:, blk].reshape(num_kv, C, rows, head_dim)
        k = pages_to_float32(k_pages[:, pages]).reshape(num_kv, C, keys, head_dim)
        v = pages_to_float32(v_pages[:, pages]).reshape(num_kv, C, keys, head_dim)
        s = jnp.einsum("kcmh,kcsh->kcms", q, k)
        if k_scales is not None:
            ks = k_scales[:, pages].astype(jnp.float32).reshape(num_kv, C, keys)  # per-token scales [K, P, L]
            s = s * ks[:, :, None, :]
        if logit_soft_cap is not None:
            s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
        k_pos = kpos[:, None] + offsets  # [C, keys]
        q_pos = g.block_qpos[blk]  # [C, Q]
        visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [C, Q, keys]; also implies k_pos < kv_len
        if sliding_window is not None:
            visible &= q_pos[:, :, None] - k_pos[:, None, :] < sliding_window
        s = jnp.where(visible[None, :, None], s.reshape(num_kv, C, group, Q, keys), _NEG)
        new_max = jnp.maximum(run_max, run_max.at[:, blk].max(s.max(-1)))
        # Masked keys give exp(_NEG - m) == 0 once the row has seen a real key; rows that have not yet (or
        # never: padding slots) pick up finite junk that the next correction exp(_NEG - m) == 0 wipes out.
        p = jnp.exp(s - new_max[:, blk][..., None])
        psum = p.sum(-1)
        if v_scales is not None:
            vs = v_scales[:, pages].astype(jnp.float32).reshape(num_kv, C, keys)
            p = p * vs[:, :, None, None, :]
        pv = jnp.einsum("kcms,kcsh->kcmh", p.reshape(num_kv, C, rows, keys), v)
        corr = jnp.exp(run_max - new_max)
        run_sum = (run_sum * corr).at[:, blk].add(psum)
        run_acc = (run_acc * corr[..., None]).at[:, blk].add(pv.reshape(num_kv, C, group, Q, head_dim))
        return new_max, run_sum, run_acc

    shape = (num_kv, NB, group, Q)
    init = (
        jnp.full(shape, _NEG, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, head_dim), jnp.float32),
    )
    # only the chunks holding real items run (none for an empty group)
    _, denom, acc = jax.lax.fori_loop(0, (g.num_items[0] + C - 1) // C, chunk, init)
    out = acc / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    return out.transpose(1, 3, 0, 2, 4).reshape(NB * Q, num_heads, head_dim)


def ragged_paged_attention_items(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    plan: WorkPlan,
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    logit_soft_cap: float | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> jax.Array:
    """``reference.ragged_paged_attention`` for the step ``plan`` was built from (one plan serves every layer
    with the sliding window it was planned for).

    q [T, N, H]; k_pages, v_pages [K, P, L, H] (float, or int8 / fp8 with ``k_scales``/``v_scales`` [K, P, L]);
    -> [T, N, H] in q's dtype. ``chunk_bytes``: a group whose working set exceeds it runs as a loop over
    item chunks (only the chunks with real items), so gathered tiles stay cache-sized for long contexts and
    big heads.
    """
    num_tokens, num_heads, head_dim = q.shape
    page_size = k_pages.shape[2]
    if plan.page_size and plan.page_size != page_size:
        raise ValueError(f"plan built for page_size {plan.page_size}, pages have {page_size}")
    if plan.sliding_window is not None and plan.sliding_window != sliding_window:
        raise ValueError(f"plan skipped pages for sliding_window={plan.sliding_window}, kernel got {sliding_window}")
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    qf = q.astype(jnp.float32) * scale
    kwargs = dict(
        sliding_window=sliding_window,
        k_scales=k_scales,
        v_scales=v_scales,
        logit_soft_cap=logit_soft_cap,
        chunk_bytes=chunk_bytes,
    )
    outs = [_attend_group(qf, k_pages, v_pages, g, **kwargs) for g in (plan.decode, plan.chunks) if g.shape[0]]
    outs.append(jnp.zeros((1, num_heads, head_dim), jnp.float32))  # what padding rows read
    out = jnp.concatenate(outs)[plan.token_slot]
    return out.astype(q.dtype)
