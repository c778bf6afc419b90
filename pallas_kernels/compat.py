"""The one place that papers over Pallas API differences between jax versions and interpreters.

CI runs jax 0.10.2 on CPU (kernels under the TPU / Mosaic GPU interpreters); the GPU machine runs jax 0.11.x.
Kernel modules import Pallas only through this module, so a moved symbol is fixed here once.

Differences handled here:

* Interpreter parameters: ``pltpu.InterpretParams`` (TPU) and ``InterpretGPUParams`` (Mosaic GPU; private
  module in 0.10.2, looked up in a few places).
* ``plgpu.kernel``: ``out_type=`` (0.10.2+) versus the older ``out_shape=``.
* The Mosaic GPU interpreter (0.10.2) lacks a few things the real lowering needs or offers, so kernels call
  the helpers below instead of the raw primitives:

  - ``plgpu.layout_cast`` / ``plgpu.broadcasted_iota(layout=...)`` have no CPU rule: ``gpu_iota`` and
    ``gpu_layout_cast`` drop the layout under the interpreter (the real lowering needs it to infer layouts);
  - a ``plgpu.transpose_ref`` operand of ``wgmma`` is rejected: ``gpu_wgmma_bt`` materialises the transposed
    tile in a scratch SMEM buffer under the interpreter and uses a transposed view on hardware;
  - a register (value) left operand of ``wgmma`` is rejected: ``gpu_wgmma_reg_a`` stores it to SMEM first
    under the interpreter.
* Both interpreters run jax ops inside ``io_callback``s while the kernel executes. If the caller dispatches
  another computation meanwhile (JAX dispatch is asynchronous), the CPU client can deadlock (seen on 2 cores:
  a test computing the jnp reference while the interpreted kernel still ran). ``wait_if_interpreted`` makes
  an eager interpreted call finish before it returns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:  # Mosaic GPU may be missing from some jaxlib builds; the TPU kernels must still import.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the jaxlib build
    plgpu = None  # type: ignore[assignment]

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

# Pallas "any" memory space (HBM on TPU): where the paged KV cache stays; kernels DMA pages from it.
ANY = pl.ANY if hasattr(pl, "ANY") else pl.MemorySpace.ANY
TPU_VMEM = pltpu.VMEM
TPU_SMEM = pltpu.SMEM


def wait_if_interpreted(out: Any, interpret: Any) -> Any:
    """``out`` once computed, when it came from an eager call under an interpreter (see the module docstring);
    unchanged inside a trace or when running compiled."""
    leaves = jax.tree.leaves(out)
    if interpret and not any(isinstance(x, jax.core.Tracer) for x in leaves):
        jax.block_until_ready(out)
    return out


# ------------------------------------------------------------------------------------------------------------
# TPU
# ------------------------------------------------------------------------------------------------------------
def tpu_interpret_params() -> Any:
    """Interpreter parameters that run a Mosaic TPU ``pallas_call`` on CPU."""
    cls = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams", None)
    if cls is None:  # pragma: no cover - very old or very new jax
        return True
    return cls()


def tpu_interpret(interpret: bool | Any) -> Any:
    """Map the public ``interpret`` flag to what ``pl.pallas_call`` wants for a TPU kernel."""
    if interpret is True:
        return tpu_interpret_params()
    return interpret or False


def tpu_compiler_params(dimension_semantics: tuple[str, ...], vmem_limit_bytes: int | None = None) -> Any:
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    kwargs: dict[str, Any] = {"dimension_semantics": dimension_semantics}
    if vmem_limit_bytes is not None:
        kwargs["vmem_limit_bytes"] = vmem_limit_bytes
    return cls(**kwargs)


def tpu_dma_semaphores(shape: tuple[int, ...]) -> Any:
    return pltpu.SemaphoreType.DMA(shape)


def tpu_async_copy(src_ref, dst_ref, sem) -> Any:
    return pltpu.make_async_copy(src_ref, dst_ref, sem)


def lower_for_platform(fn, *args, platform: str, tpu_kind: str = "TPU v5 lite") -> str:
    """Lower ``jax.jit(fn)(*args)`` for ``platform`` ("tpu" or "cuda") on any host, without a device.

    This runs the Pallas -> Mosaic lowering (layouts, tile shapes, DMA/TMA descriptors, block specs) that the
    interpreters skip, so CI on CPU still catches kernels that would not compile on the real hardware (the
    last compiler passes, in libtpu / ptxas, are not run). Mosaic TPU lowering asks the default device for its
    chip generation, hence the abstract TPU device.
    """
    if platform != "tpu":
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    from jax._src.mesh import AbstractDevice, AbstractMesh  # private in 0.10.2

    device = AbstractDevice(device_kind=tpu_kind, num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("_lowering",), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def reset_tpu_interpreter() -> None:
    """After an exception inside the TPU interpreter its global state must be reset before the next kernel."""
    fn = getattr(pltpu, "reset_tpu_interpret_mode_state", None)
    if fn is not None:
        fn()


# ------------------------------------------------------------------------------------------------------------
# Mosaic GPU
# ------------------------------------------------------------------------------------------------------------
def _find_gpu_interpret_params_class() -> Any:
    if plgpu is not None:
        for name in ("InterpretParams", "InterpretGPUParams"):
            if hasattr(plgpu, name):
                return getattr(plgpu, name)
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams
    except ImportError:  # pragma: no cover - location moved
        pass
    try:  # pragma: no cover - older layout
        from jax._src.pallas.mosaic_gpu.interpret import InterpretGPUParams  # type: ignore[attr-defined]

        return InterpretGPUParams
    except ImportError:  # pragma: no cover
        return None


def gpu_interpret_params() -> Any:
    cls = _find_gpu_interpret_params_class()
    if cls is None:  # pragma: no cover
        raise NotImplementedError("this jax has no Mosaic GPU interpreter; run the GPU kernels on a GPU")
    return cls()


def gpu_available() -> bool:
    return plgpu is not None


def reset_gpu_interpreter() -> None:
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

        fn = getattr(ipc, "reset_gpu_interpret_mode_state", None)
        if fn is not None:
            fn()
    except ImportError:  # pragma: no cover
        pass


def gpu_kernel(
    body,
    *,
    out_type,
    grid,
    grid_names,
    interpret: bool,
    scratch_types=(),
    num_threads=None,
    thread_name=None,
    compiler_params=None,
):
    """``plgpu.kernel`` with the interpreter switched on when ``interpret`` is set."""
    kwargs: dict[str, Any] = dict(grid=grid, grid_names=grid_names)
    if num_threads is not None:
        kwargs.update(num_threads=num_threads, thread_name=thread_name)
    if compiler_params is not None:
        kwargs["compiler_params"] = compiler_params
    if interpret:
        kwargs["interpret"] = gpu_interpret_params()
    try:
        return plgpu.kernel(body, out_type=out_type, scratch_types=list(scratch_types), **kwargs)
    except TypeError:  # pragma: no cover - jax without ``out_type`` / ``scratch_types``
        return plgpu.kernel(body, out_shape=out_type, scratch_shapes=list(scratch_types), **kwargs)


def gpu_smem(shape, dtype, *, tiled: bool = True):
    """An SMEM scratch type; ``tiled`` adds the tiling + swizzle that TMA and ``wgmma`` operands need."""
    if not tiled:
        return plgpu.SMEM(shape, dtype)
    return plgpu.SMEM(shape, dtype, transforms=gpu_mma_transforms(dtype, shape[-1]))


def gpu_swizzle_bytes(dtype, minor_dim: int) -> int:
    row_bytes = jnp.dtype(dtype).itemsize * minor_dim
    for swizzle in (128, 64, 32):
        if row_bytes % swizzle == 0:
            return swizzle
    raise ValueError(f"minor dimension of {row_bytes} bytes cannot be swizzled")


def gpu_mma_transforms(dtype, minor_dim: int):
    swizzle = gpu_swizzle_bytes(dtype, minor_dim)
    elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def gpu_layout_cast(x, layout_name: str, interpret: bool):
    """``plgpu.layout_cast`` to ``plgpu.Layout.<layout_name>``; a no-op under the interpreter."""
    if interpret:
        return x
    layout = getattr(plgpu.Layout, layout_name)
    return plgpu.layout_cast(x, layout)


def gpu_row_vector(x, interpret: bool):
    """Cast a per-row vector [M] to the layout of a WGMMA accumulator reduced over its columns."""
    if interpret:
        return x
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def gpu_load(ref, layout_name: str | None, interpret: bool, reduced_dim: int | None = None):
    """Load a whole SMEM ref into registers in ``plgpu.Layout.<layout_name>`` (``.reduce(reduced_dim)``)."""
    if interpret or layout_name is None:
        return ref[...]
    layout = getattr(plgpu.Layout, layout_name)
    if reduced_dim is not None:
        layout = layout.reduce(reduced_dim)
    return plgpu.load(ref, (), layout=layout)


def gpu_iota(shape, dimension: int, interpret: bool):
    """int32 iota in the WGMMA accumulator layout (plain ``lax.broadcasted_iota`` under the interpreter)."""
    if interpret:
        return jax.lax.broadcasted_iota(jnp.int32, shape, dimension)
    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def gpu_wgmma_bt(acc_ref, a_ref, b_ref, interpret: bool) -> None:
    """``acc += a @ b.T``, a [M, K] and b [N, K] in SMEM (b read through a transposed view on hardware)."""
    if not interpret:
        plgpu.wgmma(acc_ref, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
        return
    n, k = b_ref.shape

    def with_scratch(bt_ref):
        bt_ref[...] = b_ref[...].T
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, a_ref, bt_ref)

    pl.run_scoped(with_scratch, gpu_smem((k, n), b_ref.dtype))


def gpu_wgmma_reg_a(acc_ref, a_value, b_ref, interpret: bool) -> None:
    """``acc += a @ b`` with ``a`` a register value (the softmax probabilities) and b [K, N] in SMEM."""
    if not interpret:
        plgpu.wgmma(acc_ref, a_value, b_ref)
        return

    def with_scratch(a_ref):
        a_ref[...] = a_value
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, a_ref, b_ref)

    pl.run_scoped(with_scratch, gpu_smem(a_value.shape, a_value.dtype))


def replace(params: Any, **changes: Any) -> Any:
    return dataclasses.replace(params, **changes)
