"""Lower every kernel for real TPU (Mosaic TPU) and NVIDIA (Mosaic GPU) on CPU, without running it.

The interpreters skip layout inference, tile-shape rules and TMA/DMA descriptor checks; lowering exercises
them, so a kernel that only works under its interpreter fails here.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

from pallas_kernels import compat
from pallas_kernels import tpu as tpu_kernels
from tests.kernels.common import make_ragged_case


def _lower(fn, *args, platform):
    try:
        text = compat.lower_for_platform(fn, *args, platform=platform)
    except ImportError as err:  # pragma: no cover - the private abstract-device API moved
        pytest.skip(f"cannot lower for {platform} on this jax: {err}")
    assert {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu"}[platform] in text


def _ragged(int8=False, fp8=False, dtype=jnp.bfloat16, group=4, head_dim=128, page_size=16):
    return make_ragged_case(
        [(5, 40), (1, 70), (0, 3), (1, 1)],
        group=group,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        int8=int8,
        fp8=fp8,
        num_kv_heads=2,
    )


def _flash(dtype=jnp.bfloat16, q_len=256, kv_len=256, group=4, head_dim=128):
    q = jnp.zeros((1, q_len, 2 * group, head_dim), dtype)
    k = jnp.zeros((1, kv_len, 2, head_dim), dtype)
    return q, k, k, jnp.zeros((1, q_len), jnp.int32)


KERNEL_CONFIGS = [
    ("ragged", dict(), {}),
    # quantized pages: the GPU kernel TMAs each page's scale row, >= 128 bytes, so pages of >= 32 tokens
    ("ragged", dict(int8=True, page_size=32), dict(sliding_window=64, num_splits=2)),
    ("ragged", dict(fp8=True, page_size=32), {}),
    ("ragged", dict(dtype=jnp.float32, group=1, head_dim=64, page_size=64), dict(logit_soft_cap=30.0)),
    ("paged", dict(group=8), {}),
    ("flash", dict(), dict(causal=True)),
    ("flash", dict(group=1), dict(causal=False, sliding_window=128, logit_soft_cap=20.0)),
    ("flash_segments", dict(group=8, head_dim=64), dict(causal=True)),
]


def _fn_and_args(module, kind, case_kwargs, kwargs):
    if kind in ("ragged", "paged"):
        case = _ragged(**case_kwargs)
        if kind == "paged":
            q = case.q[:4]
            return (
                functools.partial(module.paged_attention, **kwargs),
                (q, case.k_pages, case.v_pages, case.kv_lens[:4], case.block_tables[:4]),
            )
        fn = functools.partial(module.ragged_paged_attention, **kwargs)
        if case.k_scales is not None:
            return (lambda *a: fn(*a[:7], k_scales=a[7], v_scales=a[8])), (
                *case.args,
                case.k_scales,
                case.v_scales,
            )
        return fn, case.args
    q, k, v, seg = _flash(**case_kwargs)
    fn = functools.partial(module.flash_attention, **kwargs)
    if kind == "flash_segments":
        return (lambda q, k, v, s: fn(q, k, v, segment_ids=s)), (q, k, v, seg)
    return fn, (q, k, v)


@pytest.mark.parametrize("kind, case_kwargs, kwargs", KERNEL_CONFIGS)
def test_tpu_kernels_lower_for_tpu(kind, case_kwargs, kwargs):
    fn, args = _fn_and_args(tpu_kernels, kind, case_kwargs, kwargs)
    _lower(fn, *args, platform="tpu")


@pytest.mark.skipif(not compat.gpu_available(), reason="this jaxlib has no Mosaic GPU")
@pytest.mark.parametrize("kind, case_kwargs, kwargs", KERNEL_CONFIGS)
def test_gpu_kernels_lower_for_cuda(kind, case_kwargs, kwargs):
    from pallas_kernels import gpu as gpu_kernels

    fn, args = _fn_and_args(gpu_kernels, kind, case_kwargs, kwargs)
    _lower(fn, *args, platform="cuda")
