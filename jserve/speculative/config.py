"""SpeculativeConfig: which proposer drafts tokens, how many, and when speculation is worth running. No jax."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NGRAM = "ngram"
EARLY_EXIT = "early_exit"
DRAFT = "draft"
METHODS = (NGRAM, EARLY_EXIT, DRAFT)


@dataclass(frozen=True)
class SpeculativeConfig:
    """One engine's speculative decoding.

    ``method``: "ngram" (prompt lookup on the host), "early_exit" (the target's first ``exit_layer`` layers plus
    its final norm and LM head draft on the device) or "draft" (a separate checkpoint with the same vocabulary
    and its own KV pages). ``num_tokens``: k, tokens drafted per step. ``max_batch_size``: the policy; a step
    speculates only while it samples at most this many sequences, since past that verifying k extra tokens
    per sequence costs more compute than the skipped decode steps save (see docs/speculative.md).
    ``adaptive``: within that, draft only where it pays (``jserve.speculative.policy``); else every request
    drafts k tokens whenever it can.
    """

    method: str
    num_tokens: int
    draft_model: str | None = None
    exit_layer: int | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    max_batch_size: int = 4
    adaptive: bool = True

    @property
    def samples_drafts(self) -> bool:
        """Drafts come from a model on the device (with a distribution q), not from host lookup."""
        return self.method != NGRAM


def speculative_config_from_args(
    speculative_model: str | None,
    num_speculative_tokens: int,
    *,
    exit_layer: int | None,
    prompt_lookup_min: int,
    prompt_lookup_max: int,
    max_batch_size: int,
    adaptive: bool = True,
) -> SpeculativeConfig | None:
    """EngineArgs' speculative fields -> a config (None when speculation is off); ValueError names the field."""
    if speculative_model is None:
        if num_speculative_tokens:
            raise ValueError("num_speculative_tokens needs speculative_model ('ngram', 'early_exit' or a draft path)")
        return None
    if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int):
        raise ValueError(f"num_speculative_tokens must be an integer, got {num_speculative_tokens!r}")
    if num_speculative_tokens == 0:
        raise ValueError(f"num_speculative_tokens: speculative_model={speculative_model!r} needs k >= 1 drafted tokens")
    if not 1 <= num_speculative_tokens <= 16:
        raise ValueError(
            f"num_speculative_tokens must be in [1, 16] with speculative_model, got {num_speculative_tokens}"
        )
    for name, value in (("prompt_lookup_min", prompt_lookup_min), ("prompt_lookup_max", prompt_lookup_max)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if prompt_lookup_min > prompt_lookup_max:
        raise ValueError(
            f"prompt_lookup_min must be <= prompt_lookup_max, got {prompt_lookup_min} > {prompt_lookup_max}"
        )
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"speculative_max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if exit_layer is not None and (isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or exit_layer < 1):
        raise ValueError(f"speculative_exit_layer must be an integer >= 1, got {exit_layer!r}")
    if speculative_model in (NGRAM, EARLY_EXIT):
        method, draft = speculative_model, None
    else:
        if not Path(speculative_model).is_dir():
            raise ValueError(
                f"speculative_model must be 'ngram', 'early_exit' or a draft checkpoint directory, got "
                f"{speculative_model!r}"
            )
        method, draft = DRAFT, str(speculative_model)
    if exit_layer is not None and method != EARLY_EXIT:
        raise ValueError("speculative_exit_layer only applies to speculative_model='early_exit'")
    return SpeculativeConfig(
        method=method,
        num_tokens=num_speculative_tokens,
        draft_model=draft,
        exit_layer=exit_layer,
        prompt_lookup_min=prompt_lookup_min,
        prompt_lookup_max=prompt_lookup_max,
        max_batch_size=max_batch_size,
        adaptive=bool(adaptive),
    )
