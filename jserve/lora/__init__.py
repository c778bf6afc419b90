"""Multi-LoRA serving: PEFT adapters on one base model, mixed in one batch, swapped without compiling.

``request``: ``LoRARequest`` (what a caller names an adapter by). ``targets``: which projections an adapter may
adapt, the device layout of the adapter slots and the low-rank update the step computes. ``peft``: reading a
PEFT directory into that layout. ``slots``: the two tiers (host LRU, device slots) and slot admission.
"""

from jserve.lora.request import LoRARequest

__all__ = ["LoRARequest"]
