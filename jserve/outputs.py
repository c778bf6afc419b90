"""Result types returned to users: RequestOutput and CompletionOutput (vLLM's names and fields, docs/api.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

Logprobs = list[dict[int, float]]
"""One dict per token: token id -> natural-log probability; the actual token is always a key."""


@dataclass
class RequestMetrics:
    """Per-request timings (seconds since the epoch) and token counts."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    # speculative decoding: drafts verified for this request (all samples) and how many were accepted
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One sample of a request. In a streamed delta, text/token_ids/logprobs hold only what is new."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Logprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" (see RequestOutput.error)
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What generate() returns per prompt, and what generate_stream() yields (as deltas)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = field(default=None, repr=False)
    # Why the engine refused the request (its samples' finish_reason is "error"): a step it was in kept failing
    # on its own. None for every request that ran normally.
    error: str | None = None
