"""Whether the host tier pays on this device: copying a page back against computing its tokens again.

Measured once before ready, from the built programs: the scatter of the largest copy bucket (host rows placed
on the device, then written into pages) per page, against a plain step of the largest built token bucket per
page of tokens. The step is an all-padding one, which attends to nothing, so it underestimates what a real
prefill of a long history costs: the comparison leans towards recomputing. Where restoring a page would cost
more than recomputing it, the engine keeps the tier off (no copies either way) and says so in the log.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jserve.engine.batch import padding_step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyCosts:
    """Seconds per page of each way to get a page's K/V onto the device, and of an eviction's copy out."""

    restore_per_page: float
    recompute_per_page: float
    offload_per_page: float

    @property
    def restores_pay(self) -> bool:
        return self.restore_per_page < self.recompute_per_page


def _median_seconds(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_copy_costs(runner, repeats: int = 3) -> CopyCosts:
    """Times the copy programs on the null page (which padding rows write anyway) and the largest built plain
    step program of ``runner`` (a ``ModelRunner`` with a ``page_mover``)."""
    mover = runner.page_mover
    bucket = mover.buckets[-1]
    null_pages = [0] * bucket
    host_pools = [np.zeros((1, *layout.shape), layout.dtype) for layout in mover.layouts()]

    def offload() -> None:
        for _, arrays in mover.gather(null_pages, runner.program_for):
            for array in arrays:
                np.asarray(array)

    def restore() -> None:
        mover.scatter(null_pages, host_pools, [0] * bucket, runner.program_for)
        for stage in runner.stages:
            for buffer in stage.kv_cache:
                buffer.block_until_ready()

    tokens = runner.ready_shapes.token_buckets[-1]
    plan = padding_step(runner.shapes, tokens)
    step = _median_seconds(lambda: runner.collect(runner.dispatch([plan])), repeats)
    return CopyCosts(
        restore_per_page=_median_seconds(restore, repeats) / bucket,
        recompute_per_page=step / (tokens / runner.page_size),
        offload_per_page=_median_seconds(offload, repeats) / bucket,
    )


def decide(costs: CopyCosts) -> bool:
    """True when the host tier should run; logs the measurement either way."""
    ms = {k: f"{v * 1e3:.3f} ms" for k, v in vars(costs).items()}
    if costs.restores_pay:
        logger.info("host KV tier on: per page %s", ms)
        return True
    logger.warning("host KV tier off: restoring a page costs more than recomputing it here (per page %s)", ms)
    return False
