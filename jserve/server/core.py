"""ServingCore: what every front end (jserve.v1 gRPC, JetStream gRPC, OpenAI HTTP) shares.

It admits or refuses calls (draining, dead engine), turns prompts into token ids with the error messages users
see, runs the request on ``AsyncLLM``, counts in-flight calls so a drain knows when it is done, and records
metrics. Front ends only translate their wire format and map the exceptions below to their status codes:

=====================  ==================  ====
exception              gRPC                HTTP
=====================  ==================  ====
ValueError             INVALID_ARGUMENT    400
RequestTooLargeError   RESOURCE_EXHAUSTED  400  (a ValueError: no retry can help)
QueueFullError         RESOURCE_EXHAUSTED  429
Unavailable            UNAVAILABLE         503
EngineDeadError        INTERNAL            500  (health turns NOT_SERVING)
RequestFailedError     INTERNAL            500  (this request alone; the engine serves on)
TimeoutError           DEADLINE_EXCEEDED   504
=====================  ==================  ====
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from jserve.engine.async_llm import AsyncLLM, EngineDeadError, EngineError, QueueFullError, RequestFailedError
from jserve.limits import RequestLimits, RequestTooLargeError, check_prompt_chars, check_token_count
from jserve.lora.registry import AdapterRegistry
from jserve.lora.request import LoRARequest
from jserve.metrics import ServerMetrics
from jserve.outputs import RequestMetrics, RequestOutput
from jserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_STALL_TIMEOUT = 60.0  # seconds in one engine step before health turns NOT_SERVING

__all__ = [
    "EngineDeadError",
    "EngineError",
    "ModelCard",
    "QueueFullError",
    "RequestFailedError",
    "RequestTooLargeError",
    "ServingCore",
    "Unavailable",
]


class Unavailable(RuntimeError):
    """The server is draining and takes no new calls."""


@dataclass(frozen=True)
class ModelCard:
    """Static facts about the served model, for GetModelInfo and /v1/models."""

    name: str
    vocab_size: int
    max_model_len: int
    page_size: int
    max_num_seqs: int
    dtype: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    num_devices: int = 1
    platform: str = "cpu"
    quantization: str = ""  # "" = dense weights, else WeightQuant.describe()
    kv_cache_dtype: str = ""


class ServingCore:
    """Admission, tokenization, in-flight accounting and metrics around one AsyncLLM."""

    def __init__(
        self,
        llm: AsyncLLM,
        card: ModelCard,
        metrics: ServerMetrics | None = None,
        *,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        adapters: AdapterRegistry | None = None,
    ):
        """``adapters``: the served LoRA adapters by name (``--enable-lora``), None without LoRA."""
        self.llm = llm
        self.adapters = adapters
        self.card = card
        self.stall_timeout = stall_timeout
        self.metrics = metrics or ServerMetrics(model_name=card.name)
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_engine_dead: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ state

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def limits(self) -> RequestLimits:
        return self.llm.engine.limits

    @property
    def engine_dead(self) -> bool:
        return self.llm.errored is not None

    @property
    def engine_stalled(self) -> bool:
        """One engine step (or admission) has run longer than ``stall_timeout``: the replica should be drained."""
        return self.llm.step_seconds > self.stall_timeout

    @property
    def serving(self) -> bool:
        return not self.draining and not self.engine_dead and not self.engine_stalled

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> dict:
        return self.llm.stats()

    def on_engine_dead(self, callback: Callable[[], None]) -> None:
        """Registers a callback run (once per call) when a request learns that the engine died."""
        self._on_engine_dead.append(callback)

    def notify_engine_dead(self) -> None:
        for callback in self._on_engine_dead:
            callback()

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no call is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ requests

    def check_accepting(self) -> None:
        """Raises for a call that must be refused before any work: draining or a dead engine."""
        if self.draining:
            self.metrics.record_outcome("unavailable")
            raise Unavailable("server is shutting down; retry on another replica")
        if self.engine_dead:
            self.metrics.record_outcome("error")
            self.notify_engine_dead()
            raise EngineDeadError(f"engine is dead: {self.llm.errored!r}")
        if self.engine_stalled:
            self.metrics.record_outcome("unavailable")
            raise Unavailable(
                f"engine has been in one step for {self.llm.step_seconds:.0f}s (stall timeout "
                f"{self.stall_timeout:g}s); retry on another replica"
            )

    def encode_prompt(
        self, prompt: str | None, token_ids: Sequence[int] | None, *, add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        """(text, ids) from exactly one of a text prompt or token ids; ValueError names the field."""
        if prompt and token_ids:
            raise ValueError("prompt: pass exactly one of prompt or token_ids, not both")
        if token_ids:
            check_token_count("token_ids", token_ids, self.card.max_model_len)  # before iterating over them
            return None, [int(t) for t in token_ids]
        if not prompt:
            raise ValueError("prompt must not be empty (pass prompt or token_ids)")
        if self.tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer; pass token_ids instead")
        check_prompt_chars("prompt", prompt, self.card.max_model_len)
        return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def validate(self, token_ids: Sequence[int], params: SamplingParams) -> None:
        """Everything the engine would reject, checked before the request is queued."""
        params.validate()
        self.llm.engine.validate(token_ids, params)

    async def generate(
        self,
        token_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        prompt: str | None = None,
        arrival: float | None = None,
        deadline_passed: Callable[[], bool] | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's deltas. Use it under ``contextlib.aclosing`` so that leaving early aborts the
        request at once instead of whenever the generator is collected."""
        tally = _RequestTally(self.metrics, len(token_ids), time.perf_counter() if arrival is None else arrival)
        self.check_accepting()
        self.validate(token_ids, params)  # NOTE: front ends count "invalid" outcomes, wherever they arise
        self._in_flight += 1
        self._idle.clear()
        try:
            # NOTE: aclosing the inner generator too, or an early exit would leave the abort to the GC.
            stream = self.llm.generate(
                token_ids, params, request_id=request_id, prompt=prompt, lora_request=lora_request
            )
            async with contextlib.aclosing(stream):
                async for out in stream:
                    tally.delta(out)
                    yield out
        except (asyncio.CancelledError, GeneratorExit):
            if deadline_passed is not None and deadline_passed():
                tally.outcome = "deadline"
            raise
        except Exception as exc:
            tally.outcome = _failure_outcome(exc, tally.outcome)
            if isinstance(exc, EngineDeadError):
                self.notify_engine_dead()
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            tally.record()


_FAILURE_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (QueueFullError, "queue_full"),
    (EngineError, "error"),  # a request the engine refused alone, or a dead engine
    (ValueError, "invalid"),
    (TimeoutError, "deadline"),
)


def _failure_outcome(exc: Exception, current: str) -> str:
    """The metrics outcome of a request that ended with ``exc`` (anything else keeps ``current``)."""
    return next((outcome for kind, outcome in _FAILURE_OUTCOMES if isinstance(exc, kind)), current)


class _RequestTally:
    """One request's serving metrics as its deltas arrive: time to first token, gaps between tokens, output
    tokens and finish reasons; ``record`` reports them once it ends (an invalid request counts nowhere but in
    the front end's counters; one refused for a full queue only as an outcome)."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int, arrival: float):
        self.metrics, self.num_prompt_tokens, self.arrival = metrics, num_prompt_tokens, arrival
        self.outcome = "cancelled"
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.num_out = 0
        self.reasons: set[str] = set()
        self.request_metrics: RequestMetrics | None = None

    def delta(self, out: RequestOutput) -> None:
        self.request_metrics = out.metrics or self.request_metrics
        new = sum(len(c.token_ids) for c in out.outputs)
        if new:
            now = time.perf_counter()
            if self.first_token is None:
                self.first_token = now
                cached = self.request_metrics.num_cached_tokens if self.request_metrics is not None else 0
                self.metrics.record_prefill(num_prompt_tokens=self.num_prompt_tokens, num_cached_tokens=cached)
            else:
                self.metrics.itl.observe(now - self.last_token)
            self.last_token = now
        self.num_out += new
        self.reasons.update(c.finish_reason for c in out.outputs if c.finish_reason)
        if out.finished:
            self.outcome = _finish_outcome(self.reasons)

    def record(self) -> None:
        if self.outcome != "invalid":
            self.metrics.record_outcome(self.outcome)
        if self.outcome not in ("queue_full", "invalid"):
            self.metrics.record_request(
                ttft=None if self.first_token is None else self.first_token - self.arrival,
                e2e=time.perf_counter() - self.arrival,
                num_output_tokens=self.num_out,
                queue_time=_queue_time(self.request_metrics),
            )


def _queue_time(m: RequestMetrics | None) -> float | None:
    """Arrival to first scheduled, both on the engine's clock."""
    if m is None or m.first_scheduled_time is None:
        return None
    return m.first_scheduled_time - m.arrival_time


def _finish_outcome(reasons: set[str]) -> str:
    """One label per request: "abort" if any sample was aborted, else "length" if any hit it, else "stop"."""
    for reason in ("abort", "length"):
        if reason in reasons:
            return reason
    return "stop"
