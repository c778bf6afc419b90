"""Public entry points: route each call to the reference or to a platform kernel."""

from __future__ import annotations

import jax

from pallas_kernels import reference

BACKENDS = ("auto", "xla", "gpu", "tpu")


def resolve_backend(backend: str) -> str:
    """"auto" -> "tpu" on TPU, "gpu" on Hopper-or-newer NVIDIA GPUs, else "xla"."""
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


def _kernel_module(backend: str, name: str):
    if backend == "gpu":
        from pallas_kernels import gpu as platform
    else:
        from pallas_kernels import tpu as platform
    return getattr(platform, name)


def flash_attention(q, k, v, *, causal=True, sliding_window=None, sm_scale=None, segment_ids=None,
                    logit_soft_cap=None, backend="auto", interpret=False):
    backend = resolve_backend(backend)
    kwargs = dict(causal=causal, sliding_window=sliding_window, sm_scale=sm_scale, segment_ids=segment_ids,
                  logit_soft_cap=logit_soft_cap)
    if backend == "xla":
        return reference.flash_attention(q, k, v, **kwargs)
    return _kernel_module(backend, "flash_attention")(q, k, v, interpret=interpret, **kwargs)


def paged_attention(q, k_pages, v_pages, lengths, block_tables, *, sm_scale=None, k_scales=None, v_scales=None,
                    logit_soft_cap=None, backend="auto", interpret=False):
    backend = resolve_backend(backend)
    kwargs = dict(sm_scale=sm_scale, k_scales=k_scales, v_scales=v_scales, logit_soft_cap=logit_soft_cap)
    if backend == "xla":
        return reference.paged_attention(q, k_pages, v_pages, lengths, block_tables, **kwargs)
    fn = _kernel_module(backend, "paged_attention")
    return fn(q, k_pages, v_pages, lengths, block_tables, interpret=interpret, **kwargs)


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs, *, sm_scale=None,
                           sliding_window=None, k_scales=None, v_scales=None, logit_soft_cap=None,
                           backend="auto", interpret=False):
    backend = resolve_backend(backend)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales,
                  logit_soft_cap=logit_soft_cap)
    args = (q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs)
    if backend == "xla":
        return reference.ragged_paged_attention(*args, **kwargs)
    return _kernel_module(backend, "ragged_paged_attention")(*args, interpret=interpret, **kwargs)
