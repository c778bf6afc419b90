"""Admission limits: a bound on every size a client controls, checked before a request reaches the engine.

One request must not be able to exhaust the server: every list or count in a request (samples, logprobs,
stop strings, stop ids, prompts, chat messages, prompt text) has a limit here, so the work admission does
(building sequences, detokenizers, stop matchers) is bounded whatever a client sends. Names follow vLLM where
it has the limit (``max_logprobs``). A violation raises ``ValueError`` naming the field and the limit; a
request whose samples could never fit in the KV pool at once raises ``RequestTooLargeError``, which the gRPC
server maps to RESOURCE_EXHAUSTED. This module imports no jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jserve.sampling_params import SamplingParams

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default
DEFAULT_MAX_STOP_STRINGS = 16
DEFAULT_MAX_STOP_STRING_CHARS = 256
DEFAULT_MAX_STOP_TOKEN_IDS = 64
DEFAULT_MAX_PROMPTS_PER_REQUEST = 64
DEFAULT_MAX_CHAT_MESSAGES = 1024
PROMPT_CHARS_PER_TOKEN = 64  # no tokenizer averages more characters per token; longer text cannot fit


class RequestTooLargeError(ValueError):
    """The request's samples need more KV pages at once than the whole pool has: it could never run."""


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """The bounds, set from EngineArgs (``max_n`` defaults to ``max_num_seqs``)."""

    max_n: int
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    max_stop_string_chars: int = DEFAULT_MAX_STOP_STRING_CHARS
    max_stop_token_ids: int = DEFAULT_MAX_STOP_TOKEN_IDS
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST
    max_chat_messages: int = DEFAULT_MAX_CHAT_MESSAGES

    def __post_init__(self) -> None:
        for name in (
            "max_n",
            "max_stop_strings",
            "max_stop_string_chars",
            "max_stop_token_ids",
            "max_prompts_per_request",
            "max_chat_messages",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")

    def check_sampling(self, params: SamplingParams) -> None:
        """The request-size fields of one SamplingParams."""
        _at_most("n", params.n, self.max_n, "max_n")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None:
                _at_most(name, value, self.max_logprobs, "max_logprobs")
        _at_most("stop", len(params.stop), self.max_stop_strings, "max_stop_strings", what="strings")
        for s in params.stop:
            if len(s) > self.max_stop_string_chars:
                raise ValueError(
                    f"stop: a stop string has {len(s)} characters; at most {self.max_stop_string_chars} "
                    "are allowed (max_stop_string_chars)"
                )
        _at_most(
            "stop_token_ids", len(params.stop_token_ids), self.max_stop_token_ids, "max_stop_token_ids", what="ids"
        )

    def check_num_prompts(self, count: int) -> None:
        _at_most("prompt", count, self.max_prompts_per_request, "max_prompts_per_request", what="prompts")

    def check_num_messages(self, count: int) -> None:
        _at_most("messages", count, self.max_chat_messages, "max_chat_messages", what="messages")


def check_prompt_chars(field: str, text: str, max_model_len: int) -> None:
    """Refuses text that cannot fit in ``max_model_len`` tokens before spending time tokenizing it."""
    limit = PROMPT_CHARS_PER_TOKEN * max_model_len
    if len(text) > limit:
        raise ValueError(
            f"{field}: {len(text)} characters cannot fit in max_model_len {max_model_len} tokens "
            f"(at most {limit} characters are accepted)"
        )


def check_token_count(field: str, token_ids: Sequence[int], max_model_len: int) -> None:
    """Refuses a token list longer than any prompt can be, before anything iterates over it."""
    if len(token_ids) >= max_model_len:
        raise ValueError(
            f"{field} is too long: {len(token_ids)} tokens, max_model_len is {max_model_len} "
            "(the prompt must leave room for at least one generated token)"
        )


def pages_needed(prompt_len: int, params: SamplingParams, *, max_model_len: int, page_size: int, shared: bool) -> int:
    """KV pages the request's samples hold at once at their longest. With prefix caching the prompt's full
    pages are shared by the samples and counted once."""
    total = min(prompt_len + params.max_tokens, max_model_len)
    per_sample = -(-total // page_size)
    shared_pages = prompt_len // page_size if shared and params.n > 1 else 0
    return shared_pages + params.n * (per_sample - shared_pages)


def _at_most(field: str, value: int, limit: int, setting: str, *, what: str | None = None) -> None:
    if value > limit:
        counted = f"{value} {what}" if what else str(value)
        raise ValueError(f"{field}: got {counted}; at most {limit} allowed ({setting})")
