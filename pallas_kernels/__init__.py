"""Attention kernels for jserve: flash (prefill), paged (decode) and ragged paged (mixed step) attention.

Imports nothing from jserve. ``backend="xla"`` runs the plain-jnp reference; "gpu" / "tpu" run the Pallas kernels
(``interpret=True`` runs them on CPU under their interpreters); "auto" picks by the default device.
"""

from pallas_kernels.dispatch import flash_attention, paged_attention, ragged_paged_attention

__all__ = ["flash_attention", "paged_attention", "ragged_paged_attention"]
