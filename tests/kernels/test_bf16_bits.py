"""bfloat16 pages stored as their bits (``reference.BF16_BITS``, the CPU layout): every XLA path reads and writes
them to exactly the values of a bfloat16 pool."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference, xla
from pallas_kernels.xla_items import plan_work, ragged_paged_attention_items
from tests.kernels.common import make_ragged_case

SEQS = [(1, 17), (5, 9), (12, 30)]  # (q_len, kv_len): decode and prefill rows mixed


def _as_bits(case):
    bits = lambda pages: jax.lax.bitcast_convert_type(pages, reference.BF16_BITS)  # noqa: E731
    return dataclasses.replace(case, k_pages=bits(case.k_pages), v_pages=bits(case.v_pages))


@pytest.fixture(scope="module")
def case():
    return make_ragged_case(SEQS, num_kv_heads=2, group=2, head_dim=32, page_size=8, dtype=jnp.bfloat16)


def test_pages_to_float32_is_the_bfloat16_value():
    values = jnp.asarray([0.0, -0.0, 1.5, -3.140625, 1e-38, 3.0e38, jnp.inf, -jnp.inf], jnp.bfloat16)
    got = reference.pages_to_float32(jax.lax.bitcast_convert_type(values, reference.BF16_BITS))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(values.astype(jnp.float32)))
    assert got.dtype == jnp.float32


def test_write_to_bits_matches_bfloat16_pool(case):
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((4, 2, 32)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((4, 2, 32)), jnp.float32)
    slots = jnp.asarray([9, 10, 0, 31], jnp.int32)
    want = reference.write_to_pages(case.k_pages, case.v_pages, k, v, slots)
    bits = _as_bits(case)
    got = reference.write_to_pages(bits.k_pages, bits.v_pages, k, v, slots)
    assert got[0].dtype == reference.BF16_BITS
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(g, jnp.bfloat16)), np.asarray(w))


@pytest.mark.parametrize("path", ["reference", "page_loop", "items"])
def test_attention_on_bits_equals_bfloat16(case, path):
    def run(c):
        if path == "reference":
            return reference.ragged_paged_attention(*c.args)
        if path == "page_loop":
            return xla.ragged_paged_attention(*c.args)
        plan = plan_work(
            np.asarray(c.kv_lens),
            np.asarray(c.cu_q_lens),
            np.asarray(c.num_seqs),
            np.asarray(c.block_tables),
            page_size=8,
            num_tokens=c.q.shape[0],
            q_block=4,
        )
        return jax.jit(ragged_paged_attention_items)(c.q, c.k_pages, c.v_pages, plan)

    want = run(case)
    got = run(_as_bits(case))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
