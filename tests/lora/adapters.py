"""Real PEFT LoRA adapters for the tests: ``peft.get_peft_model`` on a tiny random checkpoint's torch model,
with random (not zero) B so that each adapter changes the model visibly, saved with ``save_pretrained``."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import peft
import torch

from jserve import LoRARequest
from jserve.lora.request import ALL_TARGETS
from tests.models.test_parity import _hf_greedy as greedy  # noqa: F401 - re-exported for the LoRA tests
from tests.models.test_parity import _hf_prompt_logprobs as prompt_logprobs  # noqa: F401


def make_adapter(
    base: torch.nn.Module,
    out_dir: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: float = 16,
    targets: list[str] | tuple[str, ...] | str = ALL_TARGETS,
    scale: float = 0.3,
    **config,
) -> tuple[Path, torch.nn.Module]:
    """Writes an adapter of ``base`` (left untouched) to ``out_dir``; returns (dir, the peft model, eval mode)."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets if isinstance(targets, str) else list(targets),
        init_lora_weights=False,
        **config,
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, scale)
    model.save_pretrained(out_dir)
    return Path(out_dir), model.eval()


def request(path: Path, lora_id: int) -> LoRARequest:
    return LoRARequest(f"adapter-{lora_id}", lora_id, str(path))


def ours(output, prompt: list[int]) -> np.ndarray:
    """A jserve RequestOutput's prompt logprobs, aligned with ``prompt_logprobs``."""
    return np.array([output.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
