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
from pallas_kernels.reference import pages_as_float

try:  # jax >= 0.7 exposes shard_map at the top level
    from jax import shard_map
except ImportError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map


class PallasBackend(AttentionBackend):
    kernel = ""  # pallas_kernels backend name
    interpret = False

    def attend(self, q, kv, metadata, *, sm_scale, sliding_window, soft_cap=None):
        def kernel(q, kv, kv_lens, block_tables, cu_q_lens, num_seqs):
            return pallas_kernels.ragged_paged_attention(
                q,
                pages_as_float(kv[0]),  # bf16 bits on CPU (interpreted kernels): a copy, correct not fast
                pages_as_float(kv[1]),
                kv_lens,
                block_tables,
                cu_q_lens,
                num_seqs,
                sm_scale=sm_scale,
                sliding_window=sliding_window,
                logit_soft_cap=soft_cap,
                backend=self.kernel,
                interpret=self.interpret,
                **self.scales(kv),
            )

        m = metadata
        args = (q, tuple(kv), m.kv_lens, m.block_tables, m.cu_q_lens, m.num_seqs)
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


def _local_heads_attention(kernel, mesh: Mesh, q, kv, *meta_arrays):
    """Runs a kernel on each device's own heads.

    Query heads are split over "tp". KV pages (and their scales) are split the same way when tp divides the kv
    heads; otherwise they are replicated and each device slices out the one kv head its query heads share.
    """
    tp = mesh.shape["tp"]
    num_heads, num_kv_heads = q.shape[1], kv[0].shape[0]
    kv_split = num_kv_heads % tp == 0
    kv_spec = P("tp") if kv_split else P()

    def local(q, kv, *meta_arrays):
        if not kv_split:  # tp > num_kv_heads: this device's query heads all belong to one kv head
            group = num_heads // num_kv_heads
            head = jax.lax.axis_index("tp") * (num_heads // tp) // group
            kv = tuple(jax.lax.dynamic_slice_in_dim(a, head, 1, axis=0) for a in kv)
        return kernel(q, kv, *meta_arrays)

    return shard_map(
        local,
        mesh=mesh,
        in_specs=(P(None, "tp"), (kv_spec,) * len(kv)) + (P(),) * len(meta_arrays),
        out_specs=P(None, "tp"),
        check_vma=False,
    )(q, kv, *meta_arrays)
