"""Public entry points: route each call to the reference or to a platform kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.checks import GPU_MIN_QUANTIZED_PAGE_SIZE

BACKENDS = ("auto", "xla", "gpu", "tpu")


def resolve_backend(backend: str) -> str:
    """ "auto" -> "tpu" on TPU, "gpu" on Hopper-or-newer NVIDIA GPUs, else "xla"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    device = jax.devices()[0]
    if device.platform == "tpu":
        return "tpu"
    if device.platform == "gpu" and _is_hopper_or_newer(device):
        return "gpu"
    return "xla"


def _is_hopper_or_newer(device: jax.Device) -> bool:
    capability = getattr(device, "compute_capability", None)
    try:
        return capability is not None and float(capability) >= 9.0
    except ValueError:
        return False


def gpu_supports(head_dim: int, page_size: int | None = None, *, quantized_kv: bool = False) -> bool:
    """Shapes the Mosaic GPU kernels take: wgmma tiles need head_dim % 64; a KV step is 64 keys of whole pages
    (page_size dividing 64) or one page of 64..256 keys; int8 / fp8 pages need pages of >= 32 tokens."""
    if head_dim % 64:
        return False
    if quantized_kv and page_size is not None and page_size < GPU_MIN_QUANTIZED_PAGE_SIZE:
        return False
    return page_size is None or 64 % page_size == 0 and page_size % 8 == 0 or page_size in (128, 192, 256)


def pick_backend(
    backend: str, head_dim: int, page_size: int | None = None, dtype=None, *, quantized_kv: bool = False
) -> str:
    """Resolve the backend. "auto" on a GPU falls back to the XLA reference where the Mosaic GPU kernels are the
    wrong tool: shapes they cannot take, and float32 (their matmuls run in bf16, ~1e-2 off; the reference keeps
    float32). Forcing "gpu" keeps the kernel, which then raises its own error for a shape it cannot take."""
    resolved = resolve_backend(backend)
    if backend == "auto" and resolved == "gpu":
        unsupported = not gpu_supports(head_dim, page_size, quantized_kv=quantized_kv)
        if unsupported or (dtype is not None and jnp.dtype(dtype) == jnp.float32):
            return "xla"
    return resolved


def _finished_if_interpreted(out, interpret):
    """``compat.wait_if_interpreted``, imported here: compat imports Pallas (Mosaic GPU and TPU), which a process
    on the XLA path never needs (it costs ~0.4 s of start-up)."""
    from pallas_kernels.compat import wait_if_interpreted

    return wait_if_interpreted(out, interpret)


def _kernel_module(backend: str, name: str):
    if backend == "gpu":
        from pallas_kernels import gpu as platform
    else:
        from pallas_kernels import tpu as platform
    return getattr(platform, name)


def flash_attention(
    q,
    k,
    v,
    *,
    causal=True,
    sliding_window=None,
    sm_scale=None,
    segment_ids=None,
    logit_soft_cap=None,
    backend="auto",
    interpret=False,
):
    """Dense (prefill) attention; semantics of ``reference.flash_attention``.

    Args:
        q: [B, Tq, N, H]. k, v: [B, Tk, K, H] with N a multiple of K (GQA without repeating K/V).
        backend: "auto" | "xla" | "gpu" | "tpu"; ``interpret=True`` runs a gpu/tpu kernel on CPU.

    Returns:
        [B, Tq, N, H] in q's dtype.
    """
    backend = pick_backend(backend, q.shape[-1], dtype=q.dtype)
    kwargs = dict(
        causal=causal,
        sliding_window=sliding_window,
        sm_scale=sm_scale,
        segment_ids=segment_ids,
        logit_soft_cap=logit_soft_cap,
    )
    if backend == "xla":
        return reference.flash_attention(q, k, v, **kwargs)
    out = _kernel_module(backend, "flash_attention")(q, k, v, interpret=interpret, **kwargs)
    return _finished_if_interpreted(out, interpret)


def paged_attention(
    q,
    k_pages,
    v_pages,
    lengths,
    block_tables,
    *,
    sm_scale=None,
    k_scales=None,
    v_scales=None,
    logit_soft_cap=None,
    backend="auto",
    interpret=False,
):
    """Decode attention, one new token per sequence; semantics of ``reference.paged_attention``.

    Args:
        q: [B, N, H]. k_pages, v_pages: [K, P, L, H] (int8 / fp8 with ``k_scales``/``v_scales`` [K, P, L]).
        lengths: [B] tokens in cache including this one. block_tables: [B, Pmax] page ids.
        backend: "auto" | "xla" | "gpu" | "tpu"; ``interpret=True`` runs a gpu/tpu kernel on CPU.

    Returns:
        [B, N, H] in q's dtype.
    """
    backend = pick_backend(backend, q.shape[-1], k_pages.shape[2], q.dtype)
    kwargs = dict(sm_scale=sm_scale, k_scales=k_scales, v_scales=v_scales, logit_soft_cap=logit_soft_cap)
    if backend == "xla":
        return reference.paged_attention(q, k_pages, v_pages, lengths, block_tables, **kwargs)
    fn = _kernel_module(backend, "paged_attention")
    out = fn(q, k_pages, v_pages, lengths, block_tables, interpret=interpret, **kwargs)
    return _finished_if_interpreted(out, interpret)


def ragged_paged_attention(
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale=None,
    sliding_window=None,
    k_scales=None,
    v_scales=None,
    logit_soft_cap=None,
    backend="auto",
    interpret=False,
):
    """The engine's mixed prefill/decode step; semantics of ``reference.ragged_paged_attention``.

    Args:
        q: [T, N, H] new tokens of all sequences, packed; rows past ``cu_q_lens[num_seqs]`` are padding.
        k_pages, v_pages: [K, P, L, H] with this step's K/V already written (int8 / fp8 with scales [K, P, L]).
        kv_lens: [S]. block_tables: [S, Pmax]. cu_q_lens: [S + 1], non-decreasing. num_seqs: int32 [1].
        backend: "auto" | "xla" | "gpu" | "tpu"; ``interpret=True`` runs a gpu/tpu kernel on CPU.

    Returns:
        [T, N, H] in q's dtype.
    """
    backend = pick_backend(backend, q.shape[-1], k_pages.shape[2], q.dtype)
    kwargs = dict(
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        k_scales=k_scales,
        v_scales=v_scales,
        logit_soft_cap=logit_soft_cap,
    )
    args = (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    if backend == "xla":
        return reference.ragged_paged_attention(*args, **kwargs)
    out = _kernel_module(backend, "ragged_paged_attention")(*args, interpret=interpret, **kwargs)
    return _finished_if_interpreted(out, interpret)
