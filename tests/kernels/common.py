"""Shared helpers for the kernel tests: random paged caches and float64 numpy ground truth.

The numpy functions below are written independently of ``pallas_kernels.reference`` (per-sequence loops over
only the valid keys), so a kernel is checked against two implementations that share no code.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np

GARBAGE = 300.0  # value written where no valid key lives: a missing mask shows up as a large error


def tolerance(dtype) -> float:
    return 1e-4 if jnp.dtype(dtype) == jnp.float32 else 3e-2


def assert_close(actual, expected, atol: float, what: str = "") -> None:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(
        jnp.asarray(expected, jnp.float32) if not isinstance(expected, np.ndarray) else expected, np.float64
    )
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite output"
    err = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= atol + atol * np.abs(expected)[worst], (
        f"{what}: max abs error {err.max():.3g} at {worst} (actual {actual[worst]:.5g}, "
        f"expected {expected[worst]:.5g}, atol {atol})"
    )


@dataclasses.dataclass
class RaggedCase:
    q: jnp.ndarray  # [T, N, H]
    k_pages: jnp.ndarray  # [K, P, L, H]
    v_pages: jnp.ndarray
    kv_lens: jnp.ndarray  # [S]
    block_tables: jnp.ndarray  # [S, Pmax]
    cu_q_lens: jnp.ndarray  # [S + 1]
    num_seqs: jnp.ndarray  # [1]
    k_scales: jnp.ndarray | None = None  # [K, P, L]: one scale per token slot and kv head
    v_scales: jnp.ndarray | None = None

    @property
    def args(self):
        return (
            self.q,
            self.k_pages,
            self.v_pages,
            self.kv_lens,
            self.block_tables,
            self.cu_q_lens,
            self.num_seqs,
        )

    @property
    def scale_kwargs(self):
        return dict(k_scales=self.k_scales, v_scales=self.v_scales)


def make_ragged_case(
    seqs: list[tuple[int, int]],  # (q_len, kv_len) per sequence; kv_len includes the new tokens
    *,
    num_kv_heads: int = 1,
    group: int = 1,
    head_dim: int = 64,
    page_size: int = 8,
    dtype=jnp.float32,
    int8: bool = False,
    fp8: bool = False,  # float8_e4m3fn pages with per-token scales
    extra_seqs: int = 1,  # padding rows of block_tables / kv_lens / cu_q_lens past num_seqs
    extra_tokens: int = 3,  # padding rows of q past the last real token
    extra_pages: int = 1,  # block-table entries past each sequence's last page, pointing at garbage pages
    seed: int = 0,
) -> RaggedCase:
    rng = np.random.default_rng(seed)
    num_seqs = len(seqs)
    max_seqs = num_seqs + extra_seqs
    pages_needed = [-(-kv // page_size) for _, kv in seqs]
    max_pages = max([n + extra_pages for n in pages_needed] + [1])
    num_pages = 1 + sum(pages_needed) + 2  # page 0 is the null page; two spare pages hold garbage
    perm = rng.permutation(np.arange(1, num_pages))
    block_tables = np.zeros((max_seqs, max_pages), np.int32)
    cursor = 0
    for i, n in enumerate(pages_needed):
        block_tables[i, :n] = perm[cursor : cursor + n]
        cursor += n
        for e in range(extra_pages):
            block_tables[i, n + e] = perm[len(perm) - 1 - (e % 2)]  # the two spare (garbage) pages
    kv_lens = np.zeros(max_seqs, np.int32)
    kv_lens[:num_seqs] = [kv for _, kv in seqs]
    q_lens = [ql for ql, _ in seqs]
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1 :] = cu[num_seqs]
    num_tokens = int(cu[num_seqs]) + extra_tokens
    num_heads = num_kv_heads * group

    shape = (num_kv_heads, num_pages, page_size, head_dim)
    if int8:
        k_pages = rng.integers(-127, 128, shape).astype(np.int8)
        v_pages = rng.integers(-127, 128, shape).astype(np.int8)
        k_scales = rng.uniform(0.002, 0.02, shape[:3]).astype(np.float32)
        v_scales = rng.uniform(0.002, 0.02, shape[:3]).astype(np.float32)
    elif fp8:
        # e4m3fn has no inf: values past 448 would become NaN
        k_pages = np.clip(rng.standard_normal(shape) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        v_pages = np.clip(rng.standard_normal(shape) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        k_scales = rng.uniform(0.002, 0.02, shape[:3]).astype(np.float32)
        v_scales = rng.uniform(0.002, 0.02, shape[:3]).astype(np.float32)
    else:
        k_pages = rng.standard_normal(shape).astype(np.float32)
        v_pages = rng.standard_normal(shape).astype(np.float32)
        k_scales = v_scales = None
    # Garbage wherever no valid key lives: unused pages and the tail of each sequence's last page.
    valid = np.zeros(shape[1:3], bool)
    for i, (_, kv) in enumerate(seqs):
        for pos in range(kv):
            valid[block_tables[i, pos // page_size], pos % page_size] = True
    garbage = 100 if int8 or fp8 else GARBAGE
    k_pages = np.where(valid[None, :, :, None], k_pages, garbage).astype(k_pages.dtype)
    v_pages = np.where(valid[None, :, :, None], v_pages, -garbage).astype(v_pages.dtype)

    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32)
    page_dtype = jnp.int8 if int8 else jnp.float8_e4m3fn if fp8 else dtype
    return RaggedCase(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, page_dtype),
        v_pages=jnp.asarray(v_pages, page_dtype),
        kv_lens=jnp.asarray(kv_lens),
        block_tables=jnp.asarray(block_tables),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.asarray([num_seqs], jnp.int32),
        k_scales=None if k_scales is None else jnp.asarray(k_scales),
        v_scales=None if v_scales is None else jnp.asarray(v_scales),
    )


def _softcap(s, cap):
    return s if cap is None else cap * np.tanh(s / cap)


def _attend(q, k, v, visible, scale, soft_cap):
    """q [N, H] (one token, N heads over K kv heads); k, v [S, K, H]; visible [S] -> [N, H] in float64."""
    num_heads = q.shape[0]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out = np.zeros_like(q)
    if not visible.any():
        return out
    for n in range(num_heads):
        kk = k[visible, n // group]
        vv = v[visible, n // group]
        s = _softcap(kk @ q[n] * scale, soft_cap)
        p = np.exp(s - s.max())
        out[n] = (p / p.sum()) @ vv
    return out


def numpy_ragged(case: RaggedCase, *, sm_scale=None, sliding_window=None, logit_soft_cap=None) -> np.ndarray:
    """float64 ground truth for ragged paged attention."""
    q = np.asarray(jnp.asarray(case.q, jnp.float32), np.float64)
    kp = np.asarray(jnp.asarray(case.k_pages, jnp.float32), np.float64)
    vp = np.asarray(jnp.asarray(case.v_pages, jnp.float32), np.float64)
    if case.k_scales is not None:
        kp = kp * np.asarray(case.k_scales, np.float64)[..., None]
        vp = vp * np.asarray(case.v_scales, np.float64)[..., None]
    num_kv_heads, _, page_size, head_dim = kp.shape
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    cu = np.asarray(case.cu_q_lens)
    kv_lens = np.asarray(case.kv_lens)
    tables = np.asarray(case.block_tables)
    out = np.zeros_like(q)
    for i in range(int(case.num_seqs[0])):
        q_len = cu[i + 1] - cu[i]
        kv_len = kv_lens[i]
        positions = np.arange(kv_len)
        pages = tables[i, positions // page_size]
        k = kp[:, pages, positions % page_size].transpose(1, 0, 2)  # [S, K, H]
        v = vp[:, pages, positions % page_size].transpose(1, 0, 2)
        for j in range(q_len):
            pos = kv_len - q_len + j
            visible = positions <= pos
            if sliding_window is not None:
                visible &= pos - positions < sliding_window
            out[cu[i] + j] = _attend(q[cu[i] + j], k, v, visible, scale, logit_soft_cap)
    return out


def numpy_flash(
    q, k, v, *, causal=True, sliding_window=None, sm_scale=None, segment_ids=None, logit_soft_cap=None
) -> np.ndarray:
    """float64 ground truth for dense attention (bottom-right causal alignment)."""
    q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
    k = np.asarray(jnp.asarray(k, jnp.float32), np.float64)
    v = np.asarray(jnp.asarray(v, jnp.float32), np.float64)
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    positions = np.arange(kv_len)
    for b in range(batch):
        for t in range(q_len):
            pos = t + kv_len - q_len
            visible = np.ones(kv_len, bool)
            if causal:
                visible &= positions <= pos
            if sliding_window is not None:
                visible &= pos - positions < sliding_window
            if segment_ids is not None:
                seg = np.asarray(segment_ids)[b]
                kv_seg = seg if kv_len == q_len else seg[-kv_len:]
                visible &= kv_seg == seg[t]
            out[b, t] = _attend(q[b, t], k[b], v[b], visible, scale, logit_soft_cap)
    return out


# ------------------------------------------------------------------------------------------ tile skipping
def poison_leading_pages(case: RaggedCase, seq: int, num_pages: int) -> tuple[RaggedCase, RaggedCase]:
    """NaN in K and V of sequence ``seq``'s first ``num_pages`` pages (every kv head), and the same case with
    zeros there instead.

    For tile-skipping tests: a kernel that fetches such a page and only masks it computes ``0 * NaN`` in P @ V
    and returns NaN; a kernel that skips it matches the reference run on the zeroed case.
    """
    assert jnp.issubdtype(case.k_pages.dtype, jnp.floating), "NaN needs float pages"
    pages = jnp.asarray(np.asarray(case.block_tables)[seq, :num_pages])

    def fill(value):
        return dataclasses.replace(
            case,
            k_pages=case.k_pages.at[:, pages].set(value),
            v_pages=case.v_pages.at[:, pages].set(value),
        )

    return fill(jnp.nan), fill(0.0)


def poison_leading_keys(k, v, num_keys: int):
    """(k, v) with NaN at key positions [0, num_keys), and (k, v) with zeros there: see ``poison_leading_pages``."""

    def fill(value):
        return k.at[:, :num_keys].set(value), v.at[:, :num_keys].set(value)

    return fill(jnp.nan), fill(0.0)
