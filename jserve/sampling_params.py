"""SamplingParams: what a request asks of the sampler, validated once at the door.

Field names and meanings follow vLLM's offline API (docs/api.md) so users can move between the two.
This module imports no jax: the scheduler and the gRPC server validate requests with it on the host.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")

# The ranges a step can represent (docs/api.md, "Ranges"): every integer field fits int64 and every float is a
# finite float32; the sampler's arrays are int32 / float32, and the host narrows what it must (top_k past the
# vocabulary means no limit, seeds fold to 32 bits) only after these checks.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1
FLOAT32_MAX = 3.4028234663852886e38
MIN_TEMPERATURE = 1e-2  # vLLM's floor: logits / a smaller temperature overflow float32
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: a positive penalty below it rounds to 0


@dataclass(kw_only=True)
class StructuredOutputsParams:
    """Constrains a request's output to a language; exactly one kind is set (vLLM's names).

    - ``json``: a JSON schema (a dict, or its JSON text); the output is one JSON value valid under it.
    - ``json_object``: any JSON object.
    - ``regex``: the output fully matches the regular expression (Rust ``regex`` syntax, as llguidance reads it).
    - ``choice``: the output is exactly one of these strings.
    - ``grammar``: a Lark grammar (llguidance's dialect; the start rule is ``start``).

    Compiled off the engine thread and cached by :meth:`key`; a specification that does not compile fails its
    request with ``ValueError`` naming ``structured_outputs``.
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        set_kinds = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(
                f"structured_outputs: set exactly one of {', '.join(STRUCTURED_KINDS)}, got {set_kinds or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json: not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            kind = type(self.json).__name__
            raise ValueError(f"structured_outputs.json: a JSON schema must be an object, got {kind}")
        if self.json_object is not False and self.json_object is not True:
            raise ValueError(f"structured_outputs.json_object must be a boolean, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            strings = not isinstance(self.choice, str) and all(isinstance(c, str) and c for c in self.choice)
            if not strings or not self.choice:
                raise ValueError(
                    f"structured_outputs.choice must be a non-empty list of non-empty strings, got {self.choice!r}"
                )
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal specifications share one compiled grammar."""
        value: Any = getattr(self, self.kind)
        if self.kind in ("json", "choice"):
            value = json.dumps(value, sort_keys=True, ensure_ascii=False)
        return self.kind, str(value)


@dataclass(kw_only=True)
class SamplingParams:
    """How to pick each next token for one request. Invalid values raise ``ValueError`` naming the field."""

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    priority: int = 0
    speculative: bool = True  # False: this request never speculates (when the engine has speculative_model)
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (JSON schema, regex, ...)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop] if self.stop else []
        self.stop = _as_list("stop", self.stop, "strings")
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, "integers")
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first invalid field.

        Every number is checked against the range the step can represent (``docs/api.md``, "Ranges"), so no
        value a client sends reaches the device unchecked: integers fit int64 (seeds: 64 unsigned bits), floats
        are finite in float32. Two values are normalised as vLLM does: ``top_k=-1`` means "no limit" (as does 0,
        and any value past the vocabulary, which the sampler reads as the whole vocabulary), and a positive
        ``temperature`` below ``MIN_TEMPERATURE`` is raised to it (dividing logits by less overflows float32)."""
        self._int("n", minimum=1)
        self._int("max_tokens", minimum=1)
        self._int("min_tokens", minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens, got {self.min_tokens} > {self.max_tokens}")
        self._float("temperature", minimum=0.0)
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        self._float("top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self._int("top_k", minimum=-1)
        if self.top_k == -1:
            self.top_k = 0
        self._float("min_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self._float("repetition_penalty")
        if self.repetition_penalty < FLOAT32_TINY:
            raise ValueError(f"repetition_penalty must be > 0 in float32, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            self._float(name)
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None:
            self._int("seed", minimum=0, maximum=UINT64_MAX)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                self._int(name, minimum=0)  # the upper bound is the engine's max_logprobs
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        # the upper bound is the engine's vocabulary
        self.stop_token_ids = _check_ints("stop_token_ids", self.stop_token_ids, minimum=0)
        self._int("priority", minimum=INT64_MIN)
        self._validate_structured()

    def _validate_structured(self) -> None:
        if self.structured_outputs is None:
            return
        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - set(STRUCTURED_KINDS))
            if unknown:
                raise ValueError(f"structured_outputs: unknown field(s) {unknown}; known: {list(STRUCTURED_KINDS)}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(
                f"structured_outputs must be StructuredOutputsParams, got {type(self.structured_outputs).__name__}"
            )
        self.structured_outputs.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _int(self, name: str, *, minimum: int, maximum: int = INT64_MAX) -> None:
        setattr(self, name, _check_int(name, getattr(self, name), minimum=minimum, maximum=maximum))

    def _float(self, name: str, *, minimum: float | None = None) -> None:
        setattr(self, name, _check_float(name, getattr(self, name), minimum=minimum))


def _as_list(name: str, value: object, what: str) -> list:
    """A list field as a list (None: empty); anything but a list or tuple is a ValueError naming it."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of {what}, got {value!r}")
    return list(value)


def _check_int(name: str, value: object, *, minimum: int, maximum: int = INT64_MAX) -> int:
    """``value`` as an int (numpy integers included; bools, floats and strings are refused, never rounded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_ints(name: str, values: list, *, minimum: int, maximum: int = INT64_MAX) -> list[int]:
    """Each of ``values`` checked as ``_check_int`` does. Plain ints take a fast path (C-level min / max): a
    million stop ids validate in ~0.05 s instead of ~0.6 s, so the engine's size limit refuses them at once."""
    if all(type(v) is int for v in values) and (not values or (min(values) >= minimum and max(values) <= maximum)):
        return list(values)
    return [_check_int(name, v, minimum=minimum, maximum=maximum) for v in values]


def _check_float(name: str, value: object, *, minimum: float | None = None) -> float:
    """``value`` as a float that float32 can hold (ints and numpy floats included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, numbers.Integral) and abs(int(value)) > FLOAT32_MAX:  # float() would overflow
        raise ValueError(f"{name} must be a finite float32 number, got {value}")
    try:
        value = float(value)
    except OverflowError:  # e.g. a Fraction past float64
        raise ValueError(f"{name} must be a finite float32 number, got {value}") from None
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite float32 number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
