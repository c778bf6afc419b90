"""Pallas Mosaic TPU kernels (run on CPU with ``interpret=True``)."""

from pallas_kernels.tpu.flash_attention import flash_attention
from pallas_kernels.tpu.paged_attention import paged_attention
from pallas_kernels.tpu.ragged_paged_attention import ragged_paged_attention

__all__ = ["flash_attention", "paged_attention", "ragged_paged_attention"]
