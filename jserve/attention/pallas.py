"""The Pallas kernels (Mosaic GPU on Hopper+, Mosaic TPU; their interpreters on CPU) behind the backend API.

They read the neutral layout as is. Under tensor parallelism each device runs the kernel on its own heads
inside ``shard_map`` (Pallas kernels see local shards only).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jserve.attention.base import AttentionBackend

try:  # jax >= 0.7 exposes shard_map at the top level
    from jax import shard_map
except ImportError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map


class PallasBackend(AttentionBackend):
    kernel = ""  # pallas_kernels backend name
    interpret = False

    def attend(self, q, k_pages, v_pages, metadata, *, sm_scale, sliding_window):
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
                backend=self.kernel,
                interpret=self.interpret,
            )

        m = metadata
        args = (q, k_pages, v_pages, m.kv_lens, m.block_tables, m.cu_q_lens, m.num_seqs)
        if self.mesh is None or self.mesh.shape.get("tp", 1) == 1:
            return kernel(*args)
        return _local_heads_attention(kernel, self.mesh, *args)


class PallasGpuBackend(PallasBackend):
    name = "pallas-gpu"
    kernel = "gpu"


class PallasTpuBackend(PallasBackend):
    name = "pallas-tpu"
    kernel = "tpu"


class PallasTpuInterpretBackend(PallasTpuBackend):
    """The TPU kernel under its interpreter: attention_backend='pallas' on CPU (tests)."""

    name = "pallas-tpu-interpret"
    interpret = True


def _local_heads_attention(kernel, mesh: Mesh, q, k_pages, v_pages, *meta_arrays):
    """Runs a kernel on each device's own heads.

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
