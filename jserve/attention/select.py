"""Chooses the attention backend once, at startup, from the user's ``attention_backend`` and the model's shapes."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from jserve.attention.base import AttentionBackend
from jserve.attention.pallas import PallasGpuBackend, PallasTpuBackend, PallasTpuInterpretBackend
from jserve.attention.xla_work_items import XlaWorkItemsBackend
from jserve.engine.shapes import StepShapes
from pallas_kernels.checks import GPU_MIN_QUANTIZED_PAGE_SIZE
from pallas_kernels.dispatch import gpu_supports, pick_backend, resolve_backend

ATTENTION_BACKENDS = ("auto", "pallas", "xla")


def resolve_kernel(
    choice: str, *, head_dim: int, page_size: int, dtype, platform: str | None = None, quantized_kv: bool = False
) -> str:
    """Maps the user-facing ``attention_backend`` to "xla" | "gpu" | "tpu" | "tpu-interpret".

    "auto": the TPU kernels on TPU; the Mosaic GPU kernels on Hopper-or-newer GPUs when they can take the
    model (head_dim, page_size) and it is not float32 (see ``pallas_kernels.dispatch.pick_backend``); the XLA
    path elsewhere. "pallas": force the kernels, with a clear error where they cannot run; on CPU they run
    under their interpreters (the TPU kernel's interpreter, which is the faster one).
    """
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {choice!r}")
    platform = platform or jax.devices()[0].platform
    if choice == "xla":
        return "xla"
    if choice == "auto":
        if platform == "tpu":
            return "tpu"
        if platform == "gpu":
            return pick_backend("auto", head_dim, page_size, dtype, quantized_kv=quantized_kv)
        return "xla"
    if platform == "tpu":
        return "tpu"
    if platform == "gpu":
        if resolve_backend("auto") != "gpu":
            raise ValueError("attention_backend='pallas' on GPU needs Hopper or newer (Mosaic GPU); use 'auto'")
        if (
            quantized_kv
            and not gpu_supports(head_dim, page_size, quantized_kv=True)
            and gpu_supports(head_dim, page_size)
        ):
            raise ValueError(
                f"page_size: attention_backend='pallas' with an int8 / fp8 KV cache needs pages of >= "
                f"{GPU_MIN_QUANTIZED_PAGE_SIZE} tokens on GPU (each page's scale row is one TMA copy of >= 128 "
                f"bytes), got {page_size}; 'auto' uses the XLA path for smaller pages"
            )
        if not gpu_supports(head_dim, page_size):
            raise ValueError(
                f"attention_backend='pallas': the Mosaic GPU kernels need head_dim % 64 == 0 and a page_size "
                f"that is a multiple of 8 dividing 64 (or 128/192/256); got head_dim={head_dim}, "
                f"page_size={page_size}"
            )
        if jnp.dtype(dtype) == jnp.float32:
            warnings.warn(
                "attention_backend='pallas' with a float32 model: the Mosaic GPU kernels multiply in bf16 "
                "(~1e-2 off float32); 'auto' keeps float32 attention on the XLA path",
                stacklevel=2,
            )
        return "gpu"
    return "tpu-interpret"


def select_backend(
    choice: str,
    shapes: StepShapes,
    *,
    head_dim: int,
    sliding_windows: tuple[int | None, ...],
    dtype,
    platform: str | None = None,
    quantized_kv: bool = False,
) -> AttentionBackend:
    """The backend object for this engine. On the XLA path: work items, which plan once per distinct sliding
    window of the layers (``sliding_windows``: one entry per layer, None for full attention) and fall back to
    the page loop at run time where it is faster."""
    kernel = resolve_kernel(
        choice, head_dim=head_dim, page_size=shapes.page_size, dtype=dtype, platform=platform, quantized_kv=quantized_kv
    )
    if kernel == "gpu":
        return PallasGpuBackend(shapes)
    if kernel == "tpu":
        return PallasTpuBackend(shapes)
    if kernel == "tpu-interpret":
        return PallasTpuInterpretBackend(shapes)
    return XlaWorkItemsBackend(shapes, sliding_windows=sliding_windows)
