"""``LoRARequest``: names an adapter the way vLLM does (a name, a positive integer id, a PEFT directory)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS  # the projections an adapter may adapt


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter to apply to a request. ``lora_int_id`` identifies the adapter (positive; two requests
    with the same id share its slot); ``lora_path`` is a directory written by ``peft``'s ``save_pretrained``."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_request.lora_name must be a non-empty string")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_request.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_request.lora_path must be a non-empty path")

    @property
    def cache_root(self) -> bytes:
        """The root of this adapter's prefix-cache hash chain: K/V computed under one adapter are never served
        to another (or to the base model). Keyed by id, name and path, so an id reused for other weights after
        an unload does not hit the old adapter's pages."""
        key = f"lora\0{self.lora_int_id}\0{self.lora_name}\0{self.lora_path}".encode()
        return hashlib.blake2b(key, digest_size=16).digest()
