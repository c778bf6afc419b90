"""pallas_kernels/xla_items.py (work-item ragged paged attention + host planner) against the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import reference
from pallas_kernels.xla_items import (
    WorkPlan,
    choose_q_block,
    plan_work,
    prefer_items,
    ragged_paged_attention_items,
)
from tests.kernels.common import assert_close, make_ragged_case, numpy_ragged, tolerance


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_soft_cap", "sm_scale", "chunk_bytes"))
def _items(
    q,
    k_pages,
    v_pages,
    plan,
    k_scales,
    v_scales,
    *,
    sliding_window=None,
    logit_soft_cap=None,
    sm_scale=None,
    chunk_bytes=8 << 20,
):
    return ragged_paged_attention_items(
        q,
        k_pages,
        v_pages,
        plan,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        k_scales=k_scales,
        v_scales=v_scales,
        logit_soft_cap=logit_soft_cap,
        chunk_bytes=chunk_bytes,
    )


def _plan(case, page_size, q_block, **kwargs):
    return plan_work(
        np.asarray(case.kv_lens),
        np.asarray(case.cu_q_lens),
        np.asarray(case.num_seqs),
        np.asarray(case.block_tables),
        page_size=page_size,
        num_tokens=case.q.shape[0],
        q_block=q_block,
        **kwargs,
    )


def _run(case, plan, **kwargs):
    return _items(case.q, case.k_pages, case.v_pages, plan, case.k_scales, case.v_scales, **kwargs)


# (q_len, cached context before the new tokens): decode tokens and prefill chunks mixed in one batch.
seq_strategy = st.lists(
    st.tuples(st.one_of(st.just(1), st.integers(2, 40)), st.integers(0, 50)), min_size=1, max_size=6
)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    seqs=seq_strategy,
    group=st.sampled_from([1, 4, 8]),
    kv_heads=st.sampled_from([1, 2]),
    page_size=st.sampled_from([8, 16]),
    window=st.sampled_from([None, 1, 7, 24]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    int8=st.booleans(),
    q_block=st.sampled_from([None, 1, 4, 16]),
    pages_per_item=st.sampled_from([None, 1, 3]),
    chunked=st.booleans(),
    extra_seqs=st.integers(0, 2),
    extra_tokens=st.integers(0, 5),
)
def test_items_match_reference(
    seqs,
    group,
    kv_heads,
    page_size,
    window,
    dtype,
    int8,
    q_block,
    pages_per_item,
    chunked,
    extra_seqs,
    extra_tokens,
):
    case = make_ragged_case(
        [(q, q + ctx) for q, ctx in seqs],
        num_kv_heads=kv_heads,
        group=group,
        head_dim=32,
        page_size=page_size,
        dtype=dtype,
        int8=int8,
        extra_seqs=extra_seqs,
        extra_tokens=extra_tokens,
        extra_pages=2,
    )
    if q_block is None:
        q_block = choose_q_block([q for q, _ in seqs])
    plan = _plan(case, page_size, q_block, sliding_window=window, pages_per_item=pages_per_item)
    got = _run(case, plan, sliding_window=window, chunk_bytes=4096 if chunked else 8 << 20)
    want = reference.ragged_paged_attention(*case.args, sliding_window=window, **case.scale_kwargs)
    assert got.dtype == case.q.dtype
    assert_close(got, want, tolerance(dtype), "items vs reference")
    if extra_tokens:
        assert not np.asarray(got[-extra_tokens:], np.float32).any(), "padding rows must be zero"


@pytest.mark.parametrize("q_block", [1, 16])
def test_soft_cap_scale_and_float64_truth(q_block):
    case = make_ragged_case([(1, 37), (19, 19), (1, 5), (6, 50)], num_kv_heads=2, group=4, head_dim=32, page_size=8)
    plan = _plan(case, 8, q_block, sliding_window=20)
    kwargs = dict(sliding_window=20, logit_soft_cap=3.0, sm_scale=0.3)
    got = _run(case, plan, **kwargs)
    assert_close(got, reference.ragged_paged_attention(*case.args, **kwargs), 1e-4, "vs reference")
    assert_close(got, numpy_ragged(case, **kwargs), 1e-4, "vs numpy")


def test_chunked_loop_long_contexts_int8():
    # Several chunks per group, the last one partly padding; decodes and a prefill chunk in one step.
    case = make_ragged_case(
        [(1, 300), (1, 170), (40, 260), (1, 9)], num_kv_heads=2, group=2, head_dim=32, page_size=8, int8=True
    )
    plan = _plan(case, 8, 16, item_buckets=[512])
    assert plan.decode.shape[0] == 512
    got = _run(case, plan, chunk_bytes=64 << 10)
    assert_close(got, reference.ragged_paged_attention(*case.args, **case.scale_kwargs), 1e-4)


def test_plan_structure():
    # seq 0: decode at position 40 (pages 0..5 of 8 keys); seq 1: 20-token chunk at positions 10..29;
    # seq 2: decode at position 3 with a 5-key window.
    kv_lens = np.array([41, 30, 4, 0], np.int32)
    cu = np.array([0, 1, 21, 22, 22], np.int32)
    tables = np.arange(1, 1 + 4 * 8, dtype=np.int32).reshape(4, 8)
    plan = plan_work(kv_lens, cu, np.array([3]), tables, page_size=8, num_tokens=25, q_block=16, pages_per_item=1)
    assert isinstance(plan, WorkPlan) and plan.q_block == 16
    dec, chk = plan.decode, plan.chunks
    assert dec.shape == (8, 1, 2, 1) and chk.shape == (8, 1, 2, 16)  # 6 + 1 decode items; 4 + 4 chunk items
    assert dec.num_items[0] == 7 and chk.num_items[0] == 8
    np.testing.assert_array_equal(dec.item_pages[:7, 0], [1, 2, 3, 4, 5, 6, 17])
    np.testing.assert_array_equal(dec.item_block, [0, 0, 0, 0, 0, 0, 1, 1])
    assert dec.item_pages[7, 0] == 0 and dec.item_kpos[7] >= 1 << 30  # padding item: null page, fully masked
    # Chunk blocks: rows 1..16 (positions 10..25: pages 0..3) and rows 17..20 (positions 26..29: pages 0..3).
    np.testing.assert_array_equal(chk.item_pages[:, 0], [9, 10, 11, 12] * 2)
    np.testing.assert_array_equal(chk.item_block, [0] * 4 + [1] * 4)
    np.testing.assert_array_equal(chk.block_rows[0], np.arange(1, 17))
    np.testing.assert_array_equal(chk.block_qpos[1], [26, 27, 28, 29] + [-1] * 12)
    # token_slot: decode slots first (2), then chunk blocks; padding rows point one past the end.
    np.testing.assert_array_equal(plan.token_slot[:3], [0, 2, 3])
    assert plan.token_slot[21] == 1 and plan.token_slot[20] == 2 + 16 + 3
    assert (plan.token_slot[22:] == 2 + 32).all()
    # A sliding window drops pages before the window of each block's first token.
    win = plan_work(
        kv_lens,
        cu,
        np.array([3]),
        tables,
        page_size=8,
        num_tokens=25,
        q_block=16,
        sliding_window=5,
        pages_per_item=1,
    )
    np.testing.assert_array_equal(win.decode.item_pages[:2, 0], [5, 6])  # position 40 sees 36..40: pages 4, 5
    assert win.decode.num_items[0] == 3


def test_buckets_and_empty_step():
    case = make_ragged_case([(1, 20)] * 5, page_size=8)  # one item (4 pages by default) per sequence
    plan = _plan(case, 8, 1, item_buckets=[12, 40], block_buckets=[6])
    assert plan.decode.shape[0] == 12 and plan.decode.shape[2] == 6 and plan.chunks.shape[0] == 0
    plan = _plan(case, 8, 1, item_buckets=[4])  # past the last bucket: next power of two (at least 8)
    assert plan.decode.shape[0] == 8 and plan.decode.shape[2] == 8
    empty = plan_work(
        np.zeros(2, np.int32),
        np.zeros(3, np.int32),
        np.array([0]),
        np.zeros((2, 3), np.int32),
        page_size=8,
        num_tokens=4,
        q_block=16,
    )
    out = ragged_paged_attention_items(jnp.ones((4, 2, 32)), jnp.ones((1, 3, 8, 32)), jnp.ones((1, 3, 8, 32)), empty)
    assert out.shape == (4, 2, 32) and not np.asarray(out).any()


def test_plan_is_a_jit_argument_without_retracing():
    traces = []

    @jax.jit
    def f(q, k, v, plan):
        traces.append(1)
        return ragged_paged_attention_items(q, k, v, plan)

    for seed, seqs in enumerate([[(1, 30), (1, 12)], [(1, 8), (1, 40)]]):  # same buckets, different lengths
        case = make_ragged_case(seqs, page_size=8, seed=seed, extra_pages=3)
        got = f(case.q, case.k_pages, case.v_pages, _plan(case, 8, 1))
        assert_close(got, reference.ragged_paged_attention(*case.args), 1e-4)
    assert len(traces) == 1


def test_plan_mismatch_raises():
    case = make_ragged_case([(3, 10)], page_size=8)
    with pytest.raises(ValueError, match="sliding_window"):
        ragged_paged_attention_items(case.q, case.k_pages, case.v_pages, _plan(case, 8, 4, sliding_window=4))
    with pytest.raises(ValueError, match="page_size"):
        ragged_paged_attention_items(case.q, case.k_pages, case.v_pages, _plan(case, 16, 4))


def test_choose_q_block():
    assert choose_q_block([1, 1, 1]) == 1
    assert choose_q_block([]) == 1
    assert choose_q_block([1, 7, 1]) == 16


def test_prefer_items_rule():
    rng = np.random.default_rng(0)
    assert prefer_items([1, 9, 1], [40, 60, 12])  # any prefill chunk
    assert prefer_items(np.ones(64, int), rng.integers(20, 191, 64))  # ragged decode
    assert not prefer_items(np.ones(64, int), np.full(64, 128))  # uniform decode: nothing to save
    assert not prefer_items([1], [100])  # one short decode: planning overhead dominates
    assert not prefer_items([1, 1], [900, 20], num_tokens=8)  # two sequences: the page loop always wins
    assert not prefer_items([], [])
