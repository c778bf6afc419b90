"""pallas_kernels/xla.py (the engine's page-loop attention in plain XLA) against the reference and float64 numpy."""

from __future__ import annotations

import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import reference, xla
from tests.kernels.common import assert_close, make_ragged_case, numpy_ragged

seq_strategy = st.lists(st.tuples(st.integers(1, 12), st.integers(0, 40)), min_size=1, max_size=5)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    seqs=seq_strategy,
    group=st.sampled_from([1, 4, 8]),
    kv_heads=st.sampled_from([1, 2]),
    page_size=st.sampled_from([8, 16]),
    window=st.sampled_from([None, 1, 5, 24]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    int8=st.booleans(),
)
def test_page_loop_matches_reference_and_numpy(seqs, group, kv_heads, page_size, window, dtype, int8):
    # (q_len, cached context before the new tokens) -> (q_len, kv_len)
    case = make_ragged_case(
        [(q, q + ctx) for q, ctx in seqs],
        num_kv_heads=kv_heads,
        group=group,
        head_dim=64,
        page_size=page_size,
        dtype=dtype,
        int8=int8,
    )
    got = xla.ragged_paged_attention(*case.args, sliding_window=window, **case.scale_kwargs)
    want = reference.ragged_paged_attention(*case.args, sliding_window=window, **case.scale_kwargs)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    assert_close(got, want, tol, "xla vs reference")
    assert_close(got, numpy_ragged(case, sliding_window=window), tol, "xla vs numpy")
