"""``dense_einsum``: float32 operands take plain ``jnp.einsum``; half-precision ones accumulate in float32 and
round once, and a one-row product on CPU (padded to two rows) gives the row a two-row product gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.quant.weights import dense_einsum

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((3, 256)), jnp.float32)
W = jnp.asarray(RNG.standard_normal((256, 48)) * 0.1, jnp.float32)


def test_float32_is_plain_einsum():
    np.testing.assert_array_equal(
        np.asarray(dense_einsum("td,df->tf", X, W)), np.asarray(jnp.einsum("td,df->tf", X, W))
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_accumulates_in_float32(dtype):
    x, w = X.astype(dtype), W.astype(dtype)
    got = dense_einsum("td,df->tf", x, w)
    assert got.dtype == dtype
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # one rounding of a float32 sum: within half an ulp of the exact product (plus float32's own error)
    mantissa_bits = 8 if dtype == jnp.bfloat16 else 11
    ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) + 1 - mantissa_bits)
    err = np.abs(np.asarray(got, np.float64) - exact)
    assert np.all(err <= ulp / 2 + 1e-5 * np.abs(exact) + 1e-6), float((err / ulp).max())
    wide = dense_einsum("td,df->tf", x, w, out_dtype=jnp.float32)
    assert wide.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(wide), exact, rtol=1e-5, atol=1e-5)


def test_one_row_equals_its_row_in_a_larger_product():
    x, w = X.astype(jnp.bfloat16), W.astype(jnp.bfloat16)
    one = jax.jit(lambda a: dense_einsum("td,df->tf", a, w))(x[:1])
    two = jax.jit(lambda a: dense_einsum("td,df->tf", a, w))(x[:2])
    assert one.shape == (1, 48)
    np.testing.assert_array_equal(np.asarray(one, np.float32), np.asarray(two[:1], np.float32))
