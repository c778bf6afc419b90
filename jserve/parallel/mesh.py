"""Device meshes: one ("dp", "pp", "tp") mesh over all devices, and the per-replica / per-stage sub-meshes.

Data-parallel replicas are independent engines, each on its own (pp, tp) slice; a pipeline stage runs its layers
on a ("tp",) slice of its replica.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jserve.config import ParallelConfig

AXES = ("dp", "pp", "tp")


def make_mesh(parallel: ParallelConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """All devices as a [dp, pp, tp] grid; tp neighbours are adjacent devices (fastest links)."""
    devices = list(jax.devices() if devices is None else devices)
    if parallel.world_size != len(devices):
        raise ValueError(
            f"data_parallel_size x pipeline_parallel_size x tensor_parallel_size = {parallel.world_size} must equal "
            f"the number of devices ({len(devices)})"
        )
    grid = np.asarray(devices, dtype=object).reshape(
        parallel.data_parallel_size, parallel.pipeline_parallel_size, parallel.tensor_parallel_size
    )
    return Mesh(grid, AXES)


def stage_mesh(mesh: Mesh, replica: int, stage: int) -> Mesh:
    """The ("tp",) slice that runs one pipeline stage of one replica."""
    return Mesh(mesh.devices[replica, stage], ("tp",))
