"""TPU (Pallas Mosaic TPU) kernels under the TPU interpreter vs the jnp reference and float64 numpy."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import compat, reference
from pallas_kernels import tpu as tpu_kernels
from tests.kernels.common import (
    assert_close,
    make_ragged_case,
    numpy_flash,
    numpy_ragged,
    poison_leading_keys,
    poison_leading_pages,
    tolerance,
)

_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HYPOTHESIS = settings(max_examples=4, **_SETTINGS)  # default run: a few examples
SLOW_HYPOTHESIS = settings(max_examples=40, **_SETTINGS)  # -m slow: a wider search


def check_ragged(case, dtype, *, sliding_window=None, logit_soft_cap=None, expected_case=None, **blocks):
    """Kernel on ``case`` vs both references on ``expected_case`` (default: the same case)."""
    out = tpu_kernels.ragged_paged_attention(
        *case.args,
        **case.scale_kwargs,
        sliding_window=sliding_window,
        logit_soft_cap=logit_soft_cap,
        interpret=True,
        **blocks,
    )
    out = compat.wait_if_interpreted(out, True)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    case = case if expected_case is None else expected_case
    ref = reference.ragged_paged_attention(
        *case.args, **case.scale_kwargs, sliding_window=sliding_window, logit_soft_cap=logit_soft_cap
    )
    exact = numpy_ragged(case, sliding_window=sliding_window, logit_soft_cap=logit_soft_cap)
    atol = tolerance(dtype)
    assert_close(out, ref, atol, "kernel vs reference")
    assert_close(out, exact, atol, "kernel vs float64")
    # rows past the last real token are padding: zeros
    total = int(case.cu_q_lens[int(case.num_seqs[0])])
    assert not np.any(np.asarray(out[total:], np.float32))


# ------------------------------------------------------------------------------------------------ ragged
@pytest.mark.parametrize(
    "name, seqs, kwargs",
    [
        ("decode_len1", [(1, 1)], dict(page_size=8)),
        ("page_boundary", [(1, 8), (1, 16), (3, 24)], dict(page_size=8)),
        ("mixed_prefill_decode", [(5, 13), (1, 9), (0, 4), (1, 1), (7, 7)], dict(page_size=8, group=4)),
        ("mixed_bf16", [(5, 13), (1, 9), (0, 4), (1, 1), (7, 7)], dict(group=4, dtype=jnp.bfloat16)),
        ("gqa8_h128", [(2, 20), (1, 33)], dict(page_size=16, group=8, head_dim=128)),
        ("gqa8_h128_bf16", [(2, 20), (1, 33)], dict(page_size=16, group=8, head_dim=128, dtype=jnp.bfloat16)),
        ("two_kv_heads", [(4, 11), (1, 30)], dict(page_size=8, group=2, num_kv_heads=2)),
        # the page sizes the engine uses on GPU (the hypothesis search draws 8 / 16 only)
        ("mha_h128_page32", [(3, 20), (1, 65)], dict(page_size=32, group=1, head_dim=128)),
        ("two_kv_heads_page64", [(4, 11), (1, 130)], dict(page_size=64, group=8, num_kv_heads=2)),
    ],
)
def test_ragged_cases(name, seqs, kwargs):
    kwargs = {"dtype": jnp.float32, "page_size": 8, **kwargs}
    case = make_ragged_case(seqs, **kwargs)
    check_ragged(case, kwargs["dtype"], block_q=8, pages_per_block=2)


def test_ragged_sliding_window_and_soft_cap():
    case = make_ragged_case([(6, 30), (1, 17), (3, 3)], group=4, page_size=8, seed=3)
    check_ragged(case, jnp.float32, sliding_window=7, logit_soft_cap=5.0, block_q=8, pages_per_block=1)


def test_ragged_split_k_and_query_block_spanning_sequences():
    case = make_ragged_case([(9, 40), (1, 5), (12, 12)], group=4, page_size=8, seed=4)
    check_ragged(case, jnp.float32, block_q=16, pages_per_block=2, num_splits=3)


def test_ragged_int8():
    case = make_ragged_case([(3, 19), (1, 8), (1, 1)], group=4, page_size=8, int8=True, dtype=jnp.bfloat16, seed=5)
    check_ragged(case, jnp.bfloat16, block_q=8, pages_per_block=2, num_splits=2, sliding_window=10)


def test_ragged_fp8():
    case = make_ragged_case([(3, 19), (1, 8), (1, 1)], group=4, page_size=8, fp8=True, dtype=jnp.bfloat16, seed=6)
    check_ragged(case, jnp.bfloat16, block_q=8, pages_per_block=2)


def test_ragged_default_blocks():
    case = make_ragged_case([(4, 12), (1, 20)], group=4, page_size=16, seed=6)
    check_ragged(case, jnp.float32)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_ragged_sliding_window_skips_pages_before_every_window(num_splits):
    """KV blocks before every query's window are not fetched: NaN there would survive a mask (0 * NaN in P @ V).

    Sequence 0's 4 new tokens sit at positions 92..95 with window 16; the first sees keys 77..92, so its KV
    blocks 0..3 (2 pages of 8 keys each, keys 0..63) are invisible to every token. Sequence 1 shares the query
    block. With 2 splits each split gets one of the two visible blocks.
    """
    case = make_ragged_case([(4, 96), (1, 5)], group=4, page_size=8, seed=8)
    poisoned, zeroed = poison_leading_pages(case, seq=0, num_pages=8)
    ref = reference.ragged_paged_attention(*poisoned.args, sliding_window=16)
    assert not np.all(np.isfinite(np.asarray(ref))), "the NaN pages must poison a kernel that only masks them"
    check_ragged(
        poisoned,
        jnp.float32,
        sliding_window=16,
        expected_case=zeroed,
        block_q=8,
        pages_per_block=2,
        num_splits=num_splits,
    )


@st.composite
def ragged_problems(draw):
    n = draw(st.integers(1, 4))
    seqs = []
    for _ in range(n):
        q_len = draw(st.sampled_from([0, 1, 1, 2, 5, 9]))
        context = draw(st.integers(0, 20))
        seqs.append((q_len, max(q_len + context, 1)))
    return dict(
        seqs=seqs,
        group=draw(st.sampled_from([1, 4, 8])),
        head_dim=draw(st.sampled_from([64, 128])),
        page_size=draw(st.sampled_from([8, 16])),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        int8=draw(st.booleans()),
        sliding_window=draw(st.sampled_from([None, None, 1, 6])),
        block_q=draw(st.sampled_from([8, 16])),
        pages_per_block=draw(st.integers(1, 3)),
        num_splits=draw(st.sampled_from([1, 2])),
        seed=draw(st.integers(0, 1000)),
    )


def _ragged_randomized(problem):
    case = make_ragged_case(
        problem["seqs"],
        group=problem["group"],
        head_dim=problem["head_dim"],
        page_size=problem["page_size"],
        dtype=problem["dtype"],
        int8=problem["int8"],
        seed=problem["seed"],
    )
    check_ragged(
        case,
        problem["dtype"],
        sliding_window=problem["sliding_window"],
        block_q=problem["block_q"],
        pages_per_block=problem["pages_per_block"],
        num_splits=problem["num_splits"],
    )


@HYPOTHESIS
@given(ragged_problems())
def test_ragged_randomized(problem):
    _ragged_randomized(problem)


@pytest.mark.slow
@SLOW_HYPOTHESIS
@given(ragged_problems())
def test_ragged_randomized_wide(problem):
    _ragged_randomized(problem)


# ------------------------------------------------------------------------------------------ paged (decode)
@pytest.mark.parametrize(
    "page_size, int8, num_splits, pages_per_block, soft_cap",
    [
        (16, False, 1, 1, None),
        (16, False, 2, 1, None),
        (16, True, 2, 1, None),
        (16, False, 2, 1, 2.0),  # the soft cap through the decode entry point
        (32, False, 2, 2, None),
        (64, True, 1, None, None),  # pages per block from the tuning table: the whole 4-page table
    ],
)
def test_paged_decode(page_size, int8, num_splits, pages_per_block, soft_cap):
    # lengths: 1, exactly one page, a page boundary plus one, several pages
    lens = [1, page_size, page_size + 1, 2 * page_size + 13]
    case = make_ragged_case(
        [(1, n) for n in lens],
        group=4,
        page_size=page_size,
        int8=int8,
        dtype=jnp.bfloat16,
        extra_seqs=0,
        extra_tokens=0,
        seed=7,
    )
    args = (case.q, case.k_pages, case.v_pages, case.kv_lens, case.block_tables)
    out = tpu_kernels.paged_attention(
        *args,
        **case.scale_kwargs,
        logit_soft_cap=soft_cap,
        interpret=True,
        num_splits=num_splits,
        pages_per_block=pages_per_block,
    )
    out = compat.wait_if_interpreted(out, True)
    ref = reference.paged_attention(*args, **case.scale_kwargs, logit_soft_cap=soft_cap)
    assert_close(out, ref, 3e-2, "kernel vs reference")
    assert_close(out, numpy_ragged(case, logit_soft_cap=soft_cap), 3e-2, "kernel vs float64")


# ------------------------------------------------------------------------------------------ flash
def check_flash(q, k, v, dtype, *, expected_kv=None, **kwargs):
    """Kernel on (q, k, v) vs both references on (q, *expected_kv) (default: the same k, v)."""
    blocks = {name: kwargs.pop(name) for name in ("block_q", "block_kv") if name in kwargs}
    out = tpu_kernels.flash_attention(q, k, v, interpret=True, **blocks, **kwargs)
    out = compat.wait_if_interpreted(out, True)
    assert out.shape == q.shape and out.dtype == q.dtype
    if expected_kv is not None:
        k, v = expected_kv
    atol = tolerance(dtype)
    assert_close(out, reference.flash_attention(q, k, v, **kwargs), atol, "kernel vs reference")
    assert_close(out, numpy_flash(q, k, v, **kwargs), atol, "kernel vs float64")


def flash_inputs(batch, q_len, kv_len, num_kv_heads, group, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_len, num_kv_heads * group, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)), dtype)
    return q, k, v


@pytest.mark.parametrize(
    "group, head_dim, causal, window, dtype",
    [
        (1, 64, True, None, jnp.float32),
        (1, 64, True, None, jnp.bfloat16),
        (4, 128, False, None, jnp.bfloat16),
        (8, 64, True, 5, jnp.float32),
        (4, 64, False, 4, jnp.bfloat16),
    ],
)
def test_flash_cases(group, head_dim, causal, window, dtype):
    q, k, v = flash_inputs(2, 19, 19, 1, group, head_dim, dtype)
    check_flash(q, k, v, dtype, causal=causal, sliding_window=window, block_q=8, block_kv=8)


def test_flash_segments_soft_cap_and_empty_rows():
    q, k, v = flash_inputs(2, 24, 24, 2, 2, 64, jnp.float32, seed=1)
    seg = jnp.asarray([[0] * 5 + [1] * 11 + [2] * 8, [3] * 24], jnp.int32)
    check_flash(q, k, v, jnp.float32, causal=True, segment_ids=seg, logit_soft_cap=4.0, block_q=8, block_kv=8)
    # fewer keys than queries: the first queries see no key at all (rows of zeros)
    check_flash(q, k[:, 10:], v[:, 10:], jnp.float32, causal=True, segment_ids=seg, block_q=8, block_kv=8)


def test_flash_chunk_against_longer_context():
    q, k, v = flash_inputs(1, 6, 29, 1, 4, 64, jnp.float32, seed=2)
    check_flash(q, k, v, jnp.float32, causal=True, sliding_window=9, block_q=8, block_kv=8)


def test_flash_default_blocks():
    q, k, v = flash_inputs(1, 40, 40, 2, 4, 64, jnp.bfloat16, seed=3)
    check_flash(q, k, v, jnp.bfloat16, causal=True)


def _key_blocks_fetched(fn, *args) -> set[int]:
    """Key-block indices that the K and V BlockSpec index maps of ``fn``'s pallas_call take over the whole grid:
    the blocks the pipeline DMAs (it skips a copy only when the index repeats)."""

    def find(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                return eqn
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns") and (found := find(inner)) is not None:
                    return found
        return None

    eqn = find(jax.make_jaxpr(fn)(*args).jaxpr)
    assert eqn is not None, "no pallas_call in the traced kernel"
    grid_mapping = eqn.params["grid_mapping"]
    blocks = set()
    for mapping in grid_mapping.block_mappings[1:3]:  # operands q, k, v, ...
        index_map = mapping.index_map_jaxpr
        for idx in itertools.product(*map(range, grid_mapping.grid)):
            block = jax.core.eval_jaxpr(index_map.jaxpr, index_map.consts, *map(jnp.int32, idx))
            blocks.add(int(block[2]))  # [B, K, Tk, H] blocks: (b, h, key block, 0)
    return blocks


def test_flash_sliding_window_skips_blocks_before_every_window():
    """Key blocks that no query can see are neither fetched nor computed, not just masked.

    64 queries at the end of a 256-key context, window 64: the first (position 192) sees keys 129..192, so key
    blocks 0 and 1 (64 keys each) are invisible to every query and hold NaN. A computed block would turn the NaN
    into NaN output (0 * NaN in P @ V); a fetched but uncomputed one would not, so the K/V index maps are
    checked as well.
    """
    q, k, v = flash_inputs(1, 64, 256, 1, 4, 64, jnp.float32, seed=4)
    (k_nan, v_nan), clean = poison_leading_keys(k, v, 128)
    kwargs = dict(causal=True, sliding_window=64, block_q=16, block_kv=64)
    ref = reference.flash_attention(q, k_nan, v_nan, causal=True, sliding_window=64)
    assert not np.all(np.isfinite(np.asarray(ref))), "the NaN keys must poison a kernel that only masks them"
    check_flash(q, k_nan, v_nan, jnp.float32, expected_kv=clean, **kwargs)
    kernel = functools.partial(tpu_kernels.flash_attention, interpret=True, **kwargs)
    assert _key_blocks_fetched(kernel, q, k, v) == {2, 3}


@st.composite
def flash_problems(draw):
    q_len = draw(st.integers(1, 24))
    return dict(
        q_len=q_len,
        kv_len=draw(st.sampled_from([q_len, q_len + draw(st.integers(0, 10))])),
        group=draw(st.sampled_from([1, 4, 8])),
        head_dim=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([None, 1, 7])),
        soft_cap=draw(st.sampled_from([None, 3.0])),
        block_q=draw(st.sampled_from([8, 16])),
        block_kv=draw(st.sampled_from([8, 16])),
        seed=draw(st.integers(0, 1000)),
    )


def _flash_randomized(problem):
    q, k, v = flash_inputs(
        1,
        problem["q_len"],
        problem["kv_len"],
        1,
        problem["group"],
        problem["head_dim"],
        problem["dtype"],
        problem["seed"],
    )
    check_flash(
        q,
        k,
        v,
        problem["dtype"],
        causal=problem["causal"],
        sliding_window=problem["window"],
        logit_soft_cap=problem["soft_cap"],
        block_q=problem["block_q"],
        block_kv=problem["block_kv"],
    )


@HYPOTHESIS
@given(flash_problems())
def test_flash_randomized(problem):
    _flash_randomized(problem)


@pytest.mark.slow
@SLOW_HYPOTHESIS
@given(flash_problems())
def test_flash_randomized_wide(problem):
    _flash_randomized(problem)
