"""Pallas Mosaic GPU kernels for Hopper-or-newer NVIDIA GPUs (run on CPU with ``interpret=True``)."""

from pallas_kernels.gpu.flash_attention import flash_attention
from pallas_kernels.gpu.paged_attention import paged_attention
from pallas_kernels.gpu.ragged_paged_attention import ragged_paged_attention

__all__ = ["flash_attention", "paged_attention", "ragged_paged_attention"]
