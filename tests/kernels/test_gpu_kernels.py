"""Mosaic GPU kernels under the Mosaic GPU interpreter vs the jnp reference and float64 numpy.

The GPU kernels run their matmuls in bf16 (fp32 inputs are rounded), so fp32 cases use the bf16 tolerance.
Block shapes follow the kernel's constraints: rows = group * block_q a multiple of 64, 64 keys per step.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import compat, reference
from tests.kernels.common import (
    assert_close,
    make_ragged_case,
    numpy_flash,
    numpy_ragged,
    poison_leading_keys,
    poison_leading_pages,
)

pytestmark = pytest.mark.skipif(not compat.gpu_available(), reason="this jaxlib has no Mosaic GPU")

if compat.gpu_available():
    from pallas_kernels import gpu as gpu_kernels

ATOL = 3e-2
_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HYPOTHESIS = settings(max_examples=3, **_SETTINGS)  # default run: a few examples
SLOW_HYPOTHESIS = settings(max_examples=40, **_SETTINGS)  # -m slow: a wider search


def check_ragged(case, *, sliding_window=None, logit_soft_cap=None, expected_case=None, **blocks):
    """Kernel on ``case`` vs both references on ``expected_case`` (default: the same case)."""
    out = gpu_kernels.ragged_paged_attention(
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
    assert_close(out, ref, ATOL, "kernel vs reference")
    assert_close(
        out,
        numpy_ragged(case, sliding_window=sliding_window, logit_soft_cap=logit_soft_cap),
        ATOL,
        "kernel vs float64",
    )
    total = int(case.cu_q_lens[int(case.num_seqs[0])])
    assert not np.any(np.asarray(out[total:], np.float32))


# ------------------------------------------------------------------------------------------------ ragged
@pytest.mark.parametrize(
    "name, seqs, kwargs",
    [
        ("decode_len1_gqa8", [(1, 1)], dict(page_size=8, group=8)),
        ("page_boundary_gqa4", [(1, 16), (1, 64), (3, 80)], dict(page_size=16, group=4)),
        ("mixed_gqa4", [(5, 13), (1, 9), (0, 4), (1, 1), (9, 70)], dict(page_size=8, group=4)),
        (
            "mixed_gqa4_fp32",
            [(5, 13), (1, 9), (0, 4), (1, 1), (9, 70)],
            dict(page_size=8, group=4, dtype=jnp.float32),
        ),
        ("mha_h128", [(3, 20), (1, 65)], dict(page_size=32, group=1, head_dim=128)),
        ("mha_h128_fp32", [(3, 20), (1, 65)], dict(page_size=32, group=1, head_dim=128, dtype=jnp.float32)),
        ("two_kv_heads_page64", [(4, 11), (1, 130)], dict(page_size=64, group=8, num_kv_heads=2)),
    ],
)
def test_ragged_cases(name, seqs, kwargs):
    kwargs = {"dtype": jnp.bfloat16, **kwargs}
    check_ragged(make_ragged_case(seqs, **kwargs))


def test_ragged_sliding_window_soft_cap_split_k():
    case = make_ragged_case([(6, 90), (1, 17), (3, 3), (1, 140)], group=8, page_size=16, seed=3, dtype=jnp.bfloat16)
    check_ragged(case, sliding_window=70, logit_soft_cap=5.0, num_splits=3, stages=2)


def test_ragged_int8():
    case = make_ragged_case(
        [(3, 75), (1, 8), (1, 1), (0, 9)], group=4, page_size=32, int8=True, dtype=jnp.bfloat16, seed=5
    )
    check_ragged(case, num_splits=2, sliding_window=40)


def test_quantized_pages_need_32_token_pages():
    case = make_ragged_case([(1, 8)], group=4, page_size=16, int8=True, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="page_size >= 32"):
        gpu_kernels.ragged_paged_attention(*case.args, **case.scale_kwargs, interpret=True)


def test_ragged_fp8():
    case = make_ragged_case([(3, 40), (1, 8), (1, 1)], group=4, page_size=32, fp8=True, dtype=jnp.bfloat16, seed=6)
    check_ragged(case)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_ragged_sliding_window_skips_pages_before_every_window(num_splits):
    """KV blocks before every query's window are not fetched: NaN there would survive a mask (0 * NaN in P @ V).

    Sequence 0's 3 new tokens sit at positions 253..255 with window 64; the first sees keys 190..253, so its KV
    blocks 0 and 1 (4 pages of 16 keys each, keys 0..127) are invisible to every token. Sequence 1 shares the
    query block. With 2 splits each split gets one of the two visible blocks.
    """
    case = make_ragged_case([(3, 256), (1, 20)], group=8, page_size=16, dtype=jnp.bfloat16, seed=8)
    poisoned, zeroed = poison_leading_pages(case, seq=0, num_pages=8)
    ref = reference.ragged_paged_attention(*poisoned.args, sliding_window=64)
    assert not np.all(np.isfinite(np.asarray(ref, np.float32))), "the NaN pages must poison a kernel that masks them"
    check_ragged(poisoned, sliding_window=64, expected_case=zeroed, pages_per_block=4, num_splits=num_splits)


@st.composite
def ragged_problems(draw):
    seqs = []
    for _ in range(draw(st.integers(1, 3))):
        q_len = draw(st.sampled_from([0, 1, 1, 3, 10]))
        seqs.append((q_len, max(q_len + draw(st.integers(0, 80)), 1)))
    int8 = draw(st.booleans())
    return dict(
        seqs=seqs,
        group=draw(st.sampled_from([4, 8])),
        head_dim=draw(st.sampled_from([64, 128])),
        page_size=32 if int8 else draw(st.sampled_from([8, 16, 32])),  # quantized pages: >= 32 tokens
        dtype=draw(st.sampled_from([jnp.bfloat16, jnp.float32])),
        int8=int8,
        sliding_window=draw(st.sampled_from([None, None, 1, 50])),
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
    check_ragged(case, sliding_window=problem["sliding_window"], num_splits=problem["num_splits"])


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
@pytest.mark.parametrize("int8, soft_cap", [(False, None), (True, None), (False, 2.0), (True, 2.0)])
def test_paged_decode(int8, soft_cap):
    lens = [1, 16, 64, 65, 150]  # 1, a page, a full step, one past a step, several steps
    case = make_ragged_case(
        [(1, n) for n in lens],
        group=4,
        page_size=32 if int8 else 16,
        int8=int8,
        dtype=jnp.bfloat16,
        extra_seqs=0,
        extra_tokens=0,
        seed=7,
    )
    args = (case.q, case.k_pages, case.v_pages, case.kv_lens, case.block_tables)
    out = gpu_kernels.paged_attention(*args, **case.scale_kwargs, logit_soft_cap=soft_cap, interpret=True)
    out = compat.wait_if_interpreted(out, True)
    ref = reference.paged_attention(*args, **case.scale_kwargs, logit_soft_cap=soft_cap)
    assert_close(out, ref, ATOL, "kernel vs reference")
    assert_close(out, numpy_ragged(case, logit_soft_cap=soft_cap), ATOL, "kernel vs float64")


# ------------------------------------------------------------------------------------------ flash
def flash_inputs(batch, q_len, kv_len, num_kv_heads, group, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, q_len, num_kv_heads * group, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)), dtype)
    return q, k, v


def check_flash(q, k, v, *, expected_kv=None, **kwargs):
    """Kernel on (q, k, v) vs both references on (q, *expected_kv) (default: the same k, v)."""
    blocks = {name: kwargs.pop(name) for name in ("block_q", "block_kv", "stages") if name in kwargs}
    out = gpu_kernels.flash_attention(q, k, v, interpret=True, **blocks, **kwargs)
    out = compat.wait_if_interpreted(out, True)
    assert out.shape == q.shape and out.dtype == q.dtype
    if expected_kv is not None:
        k, v = expected_kv
    assert_close(out, reference.flash_attention(q, k, v, **kwargs), ATOL, "kernel vs reference")
    assert_close(out, numpy_flash(q, k, v, **kwargs), ATOL, "kernel vs float64")


@pytest.mark.parametrize(
    "group, head_dim, causal, window, dtype",
    [
        (1, 64, True, None, jnp.bfloat16),
        (4, 128, False, None, jnp.bfloat16),
        (8, 64, True, 40, jnp.bfloat16),
        (4, 64, False, 30, jnp.float32),
        (4, 64, True, None, jnp.float32),
    ],
)
def test_flash_cases(group, head_dim, causal, window, dtype):
    q, k, v = flash_inputs(1, 100, 100, 1, group, head_dim, dtype)
    check_flash(q, k, v, causal=causal, sliding_window=window, block_kv=64)


def test_flash_segments_soft_cap_two_kv_heads():
    q, k, v = flash_inputs(2, 72, 72, 2, 4, 64, jnp.bfloat16, seed=1)
    seg = jnp.asarray([[0] * 5 + [1] * 40 + [2] * 27, [3] * 72], jnp.int32)
    check_flash(q, k, v, causal=True, segment_ids=seg, logit_soft_cap=4.0, block_kv=64)
    # fewer keys than queries: the first queries see no key at all (zeros)
    check_flash(q, k[:, 30:], v[:, 30:], causal=True, segment_ids=seg, block_kv=64)


def test_flash_chunk_against_longer_context():
    q, k, v = flash_inputs(1, 20, 150, 1, 8, 64, jnp.bfloat16, seed=2)
    check_flash(q, k, v, causal=True, sliding_window=100, block_kv=64, stages=3)


def test_flash_sliding_window_skips_blocks_before_every_window():
    """Key blocks that no query can see are never fetched, not just masked.

    64 queries at the end of a 256-key context, window 64: the first (position 192) sees keys 129..192, so key
    blocks 0 and 1 (64 keys each) are invisible to every query and hold NaN; a fetched block goes through
    P @ V, where a masked NaN key still gives 0 * NaN = NaN.
    """
    q, k, v = flash_inputs(1, 64, 256, 1, 4, 64, jnp.bfloat16, seed=4)
    (k_nan, v_nan), clean = poison_leading_keys(k, v, 128)
    ref = reference.flash_attention(q, k_nan, v_nan, causal=True, sliding_window=64)
    assert not np.all(np.isfinite(np.asarray(ref, np.float32))), "the NaN keys must poison a kernel that masks them"
    check_flash(q, k_nan, v_nan, expected_kv=clean, causal=True, sliding_window=64, block_kv=64)


@st.composite
def flash_problems(draw):
    q_len = draw(st.integers(1, 140))
    return dict(
        q_len=q_len,
        kv_len=draw(st.sampled_from([q_len, q_len + draw(st.integers(0, 70))])),
        group=draw(st.sampled_from([4, 8])),
        head_dim=draw(st.sampled_from([64, 128])),
        dtype=draw(st.sampled_from([jnp.bfloat16, jnp.float32])),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([None, 1, 70])),
        soft_cap=draw(st.sampled_from([None, 3.0])),
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
        causal=problem["causal"],
        sliding_window=problem["window"],
        logit_soft_cap=problem["soft_cap"],
        block_kv=64,
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
