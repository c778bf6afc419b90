"""Request: one sequence being generated, as the scheduler and the KV cache see it.

The engine expands a prompt with ``SamplingParams.n > 1`` into n Requests (ids ``f"{parent}-{i}"``); from here
on each one is an independent sequence. The scheduler owns the mutable state (status, ``num_computed_tokens``,
output tokens) and mutates it only on the engine thread.

This module imports no jax: the scheduler and the page pool are plain Python, testable on any host.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable

import numpy as np

from jserve.sampling_params import SamplingParams
from jserve.speculative.policy import FIRST_PROBE, Acceptance

PENDING_TOKEN = -1  # all_token_ids entry of a token sampled on the device that the host has not seen yet


class RequestStatus(enum.Enum):
    """Where a request is in its life: waiting -> running (<-> preempted) -> one of the finished states."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # evicted from running to free pages; waits to be recomputed (keeps its outputs)
    FINISHED_STOPPED = enum.auto()  # eos, a stop token id, or a stop string (engine side)
    FINISHED_LENGTH = enum.auto()  # max_tokens, max_model_len, or the KV cache cannot hold it
    FINISHED_ABORTED = enum.auto()  # client cancelled
    FINISHED_ERROR = enum.auto()  # refused by the engine: its steps kept failing (Engine step-failure isolation)

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASON

    @property
    def finish_reason(self) -> str | None:
        """The API's finish_reason string ("stop" | "length" | "abort" | "error"), None while unfinished."""
        return _FINISH_REASON.get(self)

    @classmethod
    def from_finish_reason(cls, reason: str) -> RequestStatus:
        for status, name in _FINISH_REASON.items():
            if name == reason:
                return status
        raise ValueError(f"reason must be one of {sorted(_FINISH_REASON.values())}, got {reason!r}")


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One sequence: its tokens, how far its K/V are computed, and its timings.

    NOTE: tokens only ever grow (prompt, then sampled tokens appended by the scheduler);
    ``num_computed_tokens`` counts the leading tokens whose K/V are in the cache, so it is <= ``num_tokens``
    always, and it drops back to 0 when the request is preempted (pages freed, recomputed later).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        sampling_params: SamplingParams,
        *,
        eos_token_ids: Iterable[int] = (),
        arrival_time: float | None = None,
        lora_request=None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = [int(t) for t in prompt_token_ids]
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        self.sampling_params = sampling_params
        self.arrival_time: float = time.time() if arrival_time is None else arrival_time
        # vLLM convention: a lower value is more important.
        self.priority: int = sampling_params.priority
        self.eos_token_ids: list[int] = [] if sampling_params.ignore_eos else [int(t) for t in eos_token_ids]
        # NOTE: append sampled tokens with append_output_token() so all_token_ids stays a cheap view.
        self.output_token_ids: list[int] = []
        self.num_pending_tokens = 0  # sampled on the device, not yet on the host (async scheduling)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_preemptions = 0
        self.num_step_failures = 0  # failed steps this request was in (Engine step-failure isolation)
        # Speculative decoding: tokens drafted for the next step (device-drafted methods hold placeholders until
        # the device fills them), whether a verification step is on the device, and per-request counters.
        self.draft_token_ids: list[int] = []
        self.awaiting_verification = False
        self.in_flight_drafts = 0  # draft slots of the verification on the device
        # under async scheduling (jserve.speculative.chain): draft slots of a row chained to the step still on
        # the device, drafted there (0: none), and whether such a row is on its way
        self.chain_drafts = 0
        self.chained = False
        # draft-model speculation: every computed token also went through the draft (False once a step ran
        # without it, above the policy's batch size: the request then decodes plainly to the end)
        self.draft_synced = True
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.last_accepted = 0  # accepted drafts the latest verification kept (a stop string may drop some)
        # adaptive speculation (jserve.speculative.controller): the acceptance estimate, whether the policy chose
        # the request to draft this step, how many drafts it was offered, and its probing schedule
        self.acceptance = Acceptance()
        self.wants_drafts = False
        self.drafts_offered = 0
        self.steps_without_drafts = 0
        self.probe_interval = FIRST_PROBE
        # Structured outputs: the grammar's state (a jserve.structured.GrammarState) over this sequence's output
        # tokens; None when unconstrained. Its masks need every token on the host (see Engine._constrained).
        self.grammar = None
        # Chained hashes of the full pages of all_token_ids, filled lazily by the KVCacheManager (one page
        # size per engine). Kept here, not in the pool, so a waiting request that is looked up every step is
        # hashed once and an aborted one leaves nothing behind.
        self.page_hashes: list[bytes] = []
        # Multi-LoRA: the adapter (a jserve.lora.LoRARequest, None: the base model), the device slot it runs with
        # while scheduled (1-based; 0: none held) and since when it waits for a slot. Its prefix-cache hashes
        # chain from the adapter's own root, so cached K/V are shared only among requests of one adapter.
        self.lora_request = lora_request
        self.lora_adapter = None  # its host copy (a jserve.lora.peft_adapter.HostAdapter), read when requested
        self.lora_slot = 0
        self.lora_wait_since: float | None = None
        self.hash_root: bytes = b"" if lora_request is None else lora_request.cache_root
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        self._known_array: np.ndarray | None = None  # known_token_array's buffer, valid up to _known_valid
        self._known_valid = 0

    def append_output_token(self, token_id: int) -> None:
        if self.num_pending_tokens:
            raise ValueError("append_output_token with pending tokens: resolve them first")
        self.output_token_ids.append(int(token_id))
        self._all_token_ids.append(int(token_id))

    def add_pending_token(self) -> None:
        """Async scheduling: a token was sampled on the device and is not on the host yet. It holds a position
        (``PENDING_TOKEN`` in ``all_token_ids``) so the next step can be scheduled; the device fills it in."""
        self.num_pending_tokens += 1
        self._all_token_ids.append(PENDING_TOKEN)

    def resolve_pending_token(self, token_id: int) -> None:
        """The oldest pending token arrived from the device."""
        if not self.num_pending_tokens:
            raise ValueError("no pending token to resolve")
        self._all_token_ids[len(self.prompt_token_ids) + len(self.output_token_ids)] = int(token_id)
        self.output_token_ids.append(int(token_id))
        self.num_pending_tokens -= 1

    def append_verified_tokens(self, token_ids: list[int], is_stop) -> int:
        """Speculative decoding: the accepted drafts and the target's own next token, in order, until
        ``is_stop(request)`` says the last appended one ends the request; returns how many were appended."""
        appended = 0
        for token in token_ids:
            self.append_output_token(token)
            appended += 1
            if is_stop(self):
                break
        return appended

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drops the output tokens past the first ``num_output_tokens`` (a stop string inside a verified run)."""
        self._known_valid = min(self._known_valid, self.num_prompt_tokens + num_output_tokens)
        if num_output_tokens < len(self.output_token_ids):
            del self.output_token_ids[num_output_tokens:]
            self._all_token_ids = (
                self.prompt_token_ids + self.output_token_ids + [PENDING_TOKEN] * self.num_pending_tokens
            )

    def drop_pending_tokens(self) -> None:
        """The request stopped: tokens sampled after the stop are discarded."""
        if self.num_pending_tokens:
            del self._all_token_ids[-self.num_pending_tokens :]
            self.num_pending_tokens = 0
            self.num_computed_tokens = min(self.num_computed_tokens, len(self._all_token_ids))

    def known_token_array(self) -> np.ndarray:
        """The prompt and output tokens on the host as int32 (a view of a buffer kept with the request and
        extended by the tokens added since the last call, so a long context is not converted every step)."""
        n = self.num_prompt_tokens + self.num_output_tokens
        cached = self._known_array
        valid = min(self._known_valid, n)
        if cached is None or cached.shape[0] < n:
            grown = np.zeros(max(n, 2 * (0 if cached is None else cached.shape[0]), 64), np.int32)
            if cached is not None:
                grown[:valid] = cached[:valid]
            cached = self._known_array = grown
        if valid < n:
            cached[valid:n] = self.all_token_ids[valid:n]
        self._known_valid = n
        return cached[:n]

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt, outputs, then pending tokens. Treat as read-only: it is the request's own list, not a copy."""
        real = len(self.prompt_token_ids) + len(self.output_token_ids)
        if len(self._all_token_ids) != real + self.num_pending_tokens:
            # Someone appended to output_token_ids directly; rebuild rather than serve stale tokens.
            self._all_token_ids = (
                self.prompt_token_ids + self.output_token_ids + [PENDING_TOKEN] * self.num_pending_tokens
            )
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens on the host."""
        return len(self.output_token_ids)

    @property
    def num_sampled(self) -> int:
        """Output tokens sampled so far, pending ones included: the index of the next token to sample."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens with a position (prompt, outputs, pending)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def set_finished(self, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Marks the request finished; the caller (the scheduler) frees its pages."""
        if not status.is_finished:
            raise ValueError(f"status must be a finished state, got {status}")
        self.status = status
        self.finish_reason = status.finish_reason
        self.stop_reason = stop_reason
        self.finished_time = time.time()

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_prompt_tokens}"
            f"+{self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
