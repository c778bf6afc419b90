"""Attention backends: one object per attention path, chosen once at startup (see ``base.py``).

``xla_page_loop`` and ``xla_work_items`` run in plain XLA ops (CPU, and GPUs the Pallas kernels cannot take);
``pallas`` runs the Mosaic GPU / TPU kernels of ``pallas_kernels``.
"""

from jserve.attention.base import AttentionBackend, AttentionLayout
from jserve.attention.select import ATTENTION_BACKENDS, resolve_kernel, select_backend

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionLayout",
    "resolve_kernel",
    "select_backend",
]
