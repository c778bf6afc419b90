"""OpenAI request bodies (pydantic) and their translation to SamplingParams; response pieces.

What the ``openai`` client sends for /v1/completions and /v1/chat/completions is modelled, plus vLLM's sampling
extensions. A field that is not modelled is refused with a 400 naming it (``extra="forbid"``; the HTTP server
turns pydantic's errors into "unsupported field(s): ..."), and so is a value jserve cannot honour (``best_of``
other than ``n``, ``suffix``, ``logit_bias``, ``store: true``), rather than being silently dropped. The one
exception is ``NOOP_FIELDS``: fields that only concern OpenAI's own platform, accepted and ignored.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jserve.sampling_params import INT64_MAX, SamplingParams, StructuredOutputsParams
from jserve.server.openai_structured import StructuredFields
from jserve.server.tool_calls import ToolChoice, resolve_tool_choice

NOOP_FIELDS = ("user", "safety_identifier", "metadata", "store")
"""OpenAI fields accepted and ignored: they change nothing in a response. ``user`` / ``safety_identifier``
identify the end user for OpenAI's abuse monitoring; ``metadata`` tags stored completions; ``store`` asks OpenAI
to keep the completion (only false/null is accepted: this server keeps nothing, so ``true`` is a 400)."""

LOGPROB_FLOOR = -9999.0
"""JSON has no -inf; a logprob below this is reported as this (vLLM's floor)."""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(StructuredFields):
    """Fields shared by both endpoints; names follow OpenAI, extras follow vLLM's OpenAI server (the output
    constraints: ``StructuredFields``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # NOOP_FIELDS
    user: str | None = Field(None, description="ignored (OpenAI's end-user id)")
    safety_identifier: str | None = Field(None, description="ignored (OpenAI's end-user id)")
    metadata: dict[str, str] | None = Field(None, description="ignored (tags for OpenAI's stored completions)")
    store: bool | None = Field(None, description="only false: this server stores no completions")

    def _sampling(
        self,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        forced: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """``forced``: the chat endpoint's tool-call constraint (tool_choice required or a named function)."""
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.store:
            raise ValueError("store: true is not supported (this server stores no completions)")
        kwargs: dict[str, Any] = {
            "n": self.n,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "max_tokens": max_tokens,
            "structured_outputs": self.structured_params(forced),
        }
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return SamplingParams(**kwargs)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens=0`` (lm-eval's scoring request): the prompt comes back, nothing is generated.
        The engine runs one token, which the response leaves out."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self, room: int) -> SamplingParams:
        """``room``: the tokens the longest prompt leaves before max_model_len (what ``max_tokens: null`` means)."""
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (must equal n)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1, got 0 (0 is allowed only with echo=true)")
        if self.echo_only and (self.min_tokens or 0) > 0:
            raise ValueError(f"min_tokens must be <= max_tokens, got {self.min_tokens} > 0")
        if self.echo_only:
            max_tokens = 1
        elif self.max_tokens is None:
            max_tokens = max(1, room)
        else:
            max_tokens = self.max_tokens  # SamplingParams names it if it is < 1
        prompt_logprobs = self.logprobs if self.echo else None
        return self._sampling(max_tokens, self.logprobs, prompt_logprobs)

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def for_template(self) -> dict[str, Any]:
        """The message as HF chat templates read it: tool-call arguments as objects (OpenAI sends JSON text),
        fields the client left out absent."""
        message: dict[str, Any] = {"role": self.role, "content": self.text() if self.content is not None else None}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [_call_for_template(c) for c in self.tool_calls]
        return message

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"messages: content part type {part.get('type')!r} is not supported")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # the template gets the text as sent
    return {**call, "function": function}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def tool_choice_resolved(self) -> ToolChoice:
        """``tools`` and ``tool_choice`` checked together (ValueError naming the field)."""
        return resolve_tool_choice(self.tools, self.tool_choice)

    def sampling_params(self, default_max_tokens: int, forced: StructuredOutputsParams | None = None) -> SamplingParams:
        """``max_completion_tokens`` (OpenAI's current name) wins over ``max_tokens``; neither: until the context
        is full (``default_max_tokens``)."""
        max_tokens = default_max_tokens
        for name in ("max_completion_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None:
                _in_int64(name, value, minimum=1)  # here, or SamplingParams would name max_tokens
                max_tokens = value
                break
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise ValueError("top_logprobs requires logprobs=true")
            _in_int64("top_logprobs", self.top_logprobs, minimum=0)  # here, or SamplingParams would name logprobs
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, forced=forced)


def _in_int64(name: str, value: int, *, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{name} must be <= {INT64_MAX}, got {value}")


FinishReason = Literal["stop", "length", "abort"] | None


def finish_reason(reason: str | None) -> str | None:
    """OpenAI has no "abort"; an aborted sample reports "stop" like vLLM's server does."""
    return "stop" if reason == "abort" else reason


def logprob(value: float) -> float:
    """A logprob JSON can carry: no -inf or NaN."""
    return value if math.isfinite(value) and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
