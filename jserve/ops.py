"""Attention backend selection and the one attention call the models make.

The backend is resolved once at startup (no import-time switches) and passed to the model as a static value:
"xla" runs paged attention in plain XLA ops (``pallas_kernels/xla.py``), "gpu"/"tpu" the Pallas kernels, and
``interpret`` runs a kernel on CPU. Attention metadata is an explicit pytree argument built by ``engine/batch.py``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels import reference
from pallas_kernels import xla as pallas_xla
from pallas_kernels.dispatch import gpu_supports, pick_backend, resolve_backend
from pallas_kernels.xla_items import WorkPlan, ragged_paged_attention_items

try:  # jax >= 0.7 exposes shard_map at the top level
    from jax import shard_map
except ImportError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map

ATTENTION_BACKENDS = ("auto", "pallas", "xla")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to, for one engine step.

    slot_mapping [T]: flat cache slot (page * page_size + offset) of each new token; padding -> null page 0.
    kv_lens [S]: tokens in cache per sequence, this step's included. block_tables [S, Pmax]: page ids.
    cu_q_lens [S + 1]: sequence i owns tokens cu_q_lens[i]:cu_q_lens[i+1]. num_seqs [1]: real sequences.
    """

    slot_mapping: jax.Array
    kv_lens: jax.Array
    block_tables: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    work: WorkPlan | None = None  # XLA backend, prefill/mixed steps: a work-item plan (pallas_kernels/xla_items.py)


@dataclass(frozen=True)
class AttentionBackend:
    """Resolved backend: ``kernel`` is "xla" | "gpu" | "tpu"; ``interpret`` runs Pallas kernels on CPU."""

    kernel: str = "xla"
    interpret: bool = False
    mesh: Mesh | None = None  # tensor-parallel mesh ("tp" axis): Pallas kernels then run per device in shard_map

    def replace(self, **changes) -> AttentionBackend:
        return dataclasses.replace(self, **changes)


def resolve_attention_backend(
    choice: str, *, head_dim: int, page_size: int, dtype, platform: str | None = None
) -> AttentionBackend:
    """Maps the user-facing ``attention_backend`` to a kernel, once, for this model's shapes.

    "auto": the TPU kernels on TPU; the Mosaic GPU kernels on Hopper-or-newer GPUs when they can take the
    model (head_dim, page_size) and it is not float32 (see ``pallas_kernels.dispatch.pick_backend``); the XLA
    path elsewhere. "pallas": force the kernels, with a clear error where they cannot run; on CPU they run
    under their interpreters (the TPU kernel's interpreter, which is the faster one).
    """
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {choice!r}")
    platform = platform or jax.devices()[0].platform
    if choice == "xla":
        return AttentionBackend("xla")
    if choice == "auto":
        # the engine's devices decide, not whatever jax.devices() lists first
        if platform == "tpu":
            return AttentionBackend("tpu")
        if platform == "gpu":
            return AttentionBackend(pick_backend("auto", head_dim, page_size, dtype))
        return AttentionBackend("xla")
    if platform == "tpu":
        return AttentionBackend("tpu")
    if platform == "gpu":
        if resolve_backend("auto") != "gpu":
            raise ValueError("attention_backend='pallas' on GPU needs Hopper or newer (Mosaic GPU); use 'auto'")
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
        return AttentionBackend("gpu")
    return AttentionBackend("tpu", interpret=True)


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, meta: AttentionMetadata):
    """Scatters this step's K/V [T, K, H] into the layer's pages [K, P, L, H]."""
    return reference.write_to_pages(k_pages, v_pages, k, v, meta.slot_mapping)


def paged_attention(
    backend: AttentionBackend,
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None,
) -> jax.Array:
    """q [T, N, H] against the paged cache (new K/V already written) -> [T, N, H]."""
    if backend.kernel == "xla" and meta.work is not None:
        return ragged_paged_attention_items(
            q, k_pages, v_pages, meta.work, sm_scale=sm_scale, sliding_window=sliding_window
        )
    if backend.kernel == "xla":
        return pallas_xla.ragged_paged_attention(
            q,
            k_pages,
            v_pages,
            meta.kv_lens,
            meta.block_tables,
            meta.cu_q_lens,
            meta.num_seqs,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
        )

    def kernel(q, k_pages, v_pages, kv_lens, block_tables, cu_q_lens, num_seqs):
        return pallas_kernels.ragged_paged_attention(
            q,
            k_pages,
            v_pages,
            kv_lens,
            block_tables,
            cu_q_lens,
            num_seqs,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            backend=backend.kernel,
            interpret=backend.interpret,
        )

    args = (q, k_pages, v_pages, meta.kv_lens, meta.block_tables, meta.cu_q_lens, meta.num_seqs)
    if backend.mesh is None or backend.mesh.shape.get("tp", 1) == 1:
        return kernel(*args)
    return _local_heads_attention(kernel, backend.mesh, *args)


def _local_heads_attention(kernel, mesh: Mesh, q, k_pages, v_pages, *meta_arrays):
    """Runs a kernel on each device's own heads (Pallas kernels see local shards only).

    Query heads are split over "tp". KV pages are split the same way when tp divides the kv heads; otherwise they
    are replicated and each device slices out the one kv head its query heads share.
    """
    tp = mesh.shape["tp"]
    num_heads, num_kv_heads = q.shape[1], k_pages.shape[0]
    kv_split = num_kv_heads % tp == 0
    kv_spec = P("tp") if kv_split else P()

    def local(q, k_pages, v_pages, *meta_arrays):
        if not kv_split:  # tp > num_kv_heads: this device's query heads all belong to one kv head
            group = num_heads // num_kv_heads
            head = jax.lax.axis_index("tp") * (num_heads // tp) // group
            k_pages = jax.lax.dynamic_slice_in_dim(k_pages, head, 1, axis=0)
            v_pages = jax.lax.dynamic_slice_in_dim(v_pages, head, 1, axis=0)
        return kernel(q, k_pages, v_pages, *meta_arrays)

    return shard_map(
        local,
        mesh=mesh,
        in_specs=(P(None, "tp"), kv_spec, kv_spec) + (P(),) * len(meta_arrays),
        out_specs=P(None, "tp"),
        check_vma=False,
    )(q, k_pages, v_pages, *meta_arrays)
