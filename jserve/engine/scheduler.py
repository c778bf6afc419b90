"""Iteration-level scheduler (Orca / vLLM v1 style): which tokens of which requests run in the next step.

Each ``schedule()`` builds one mixed step under two limits, ``max_num_seqs`` running sequences and
``max_num_batched_tokens`` tokens:

    1. running requests, most important first: a decoding request gets its last sampled token, a request
       still prefilling gets its next chunk (min(remaining, budget left)). A request that needs a page the
       pool cannot give preempts the least important running request (possibly itself) by recompute.
    2. if nobody was preempted, waiting requests in order (priority, then arrival; preempted ones first within
       a priority), each with a prefix-cache lookup, until a limit or the pool runs out.

Preemption (``preemption_mode``): the preempted request's pages are freed either way and it recomputes what
neither cache tier holds when it resumes. Its full pages stay in the prefix cache; with ``swap`` (the default
when a host tier exists) those evicted from the device go to the host tier and come back when it resumes,
with ``recompute`` they are dropped when evicted.

``update()`` applies a finished step: ``advance()`` (its tokens are computed; each sampling chunk gets a pending
token) then ``resolve()`` (the sampled tokens replace the pending ones; token-level stops). With async
scheduling the engine calls ``advance()`` right after dispatching a step and ``resolve()`` once its tokens reach
the host, one step later: the step in between is scheduled with the pending token in place, and the device
fills it in. A request whose token turns out to stop it has then computed one token too many, which is
discarded. There is no notion of "prefill" or "decode" beyond this: a chunk is ``num_tokens -
num_computed_tokens`` tokens or fewer, so chunked prefill, recompute after preemption and decoding are one
code path.

Prefix sharing: when waiting requests share a prefix that is not cached yet (a batch with one system prompt,
or the n samples of one prompt), the first one admitted becomes the *leader* of its first page; the others
wait while the leader is still computing pages they share, then hit those pages instead of all computing the
same tokens (in one step, or chunk by chunk alongside a chunked leader). The wait ends when the leader's
prefill passes the shared part or the leader leaves running, so nothing is deferred forever.

Requests that can never fit (their tokens need more pages than the whole pool) are finished with "length"
instead of waiting forever; so is a running request that is alone and still cannot get a page.

Failure isolation: after a step fails, the engine calls ``requeue_all()`` (every running request back to
waiting, to be recomputed) and names the requests of the failed step ``suspects``. While there are suspects,
each step runs one suspect alone (``_schedule_isolated``), so a request that makes steps fail is found and
refused without failing the others.

This module imports no jax. Not thread-safe: only the engine thread calls it.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.request import PENDING_TOKEN, Request, RequestStatus

if TYPE_CHECKING:
    from jserve.lora.slots import AdapterSlots


RECOMPUTE, SWAP = "recompute", "swap"  # preemption modes
PREEMPTION_MODES = (RECOMPUTE, SWAP)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Per-replica scheduling limits."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int
    enable_chunked_prefill: bool = True
    preemption_mode: str = RECOMPUTE

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_num_seqs ({self.max_num_seqs}), "
                f"got {self.max_num_batched_tokens}"
            )
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_model_len ({self.max_model_len}) when "
                f"enable_chunked_prefill is False, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class ScheduledChunk:
    """The tokens one request runs in a step. ``start_pos`` is its ``num_computed_tokens`` before the step."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]  # covers start_pos + len(token_ids) tokens
    sample: bool  # the chunk reaches the end of the request's tokens: sample a next token
    prompt_logprobs: bool  # the request wants prompt logprobs and this chunk holds prompt tokens
    num_drafts: int = 0  # speculative decoding: the last num_drafts token_ids are drafts to verify
    # chained verification (jserve.speculative.chain): >= 0 when the request's previous step is still on the
    # device, laid out as if its row had accepted this many drafts; its first token is that step's last one
    chain_assumed: int = -1


@dataclass(frozen=True)
class SchedulerOutput:
    """The one boundary type between the scheduler and the runner."""

    chunks: list[ScheduledChunk]  # running requests first (running order), then newly admitted ones
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)
    # Finished outside update() since the previous schedule() (aborts, finish_request, "can never fit");
    # their pages are already freed.
    finished_ids: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        # tokens a step may hold: max_num_batched_tokens, or less while larger programs are still being built
        # (precompile="background"; the engine sets it each step)
        self.token_budget = config.max_num_batched_tokens
        # NOTE: both lists stay sorted by _rank / _waiting_rank, so the least important running request is
        # always running[-1] and the next to admit is waiting[0].
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._seq: dict[str, int] = {}  # arrival order, the last tie-breaker
        self._next_seq = 0
        self._leaders: dict[bytes, Request] = {}  # first-page hash -> request computing that prefix
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.prompt_tokens_computed = 0
        self.prompt_tokens_recomputed = 0  # of which after a preemption
        self.speculating = False  # the engine speculates this step (set before schedule(); see _awaits_verification)
        self.suspects: set[str] = set()  # in a failed step: each runs alone until it passes a step (or is refused)
        self.adapters: AdapterSlots | None = None  # multi-LoRA: a running request holds its adapter's device slot

    # ---- queries ---------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def _rank(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time, self._seq[request.request_id])

    def _waiting_rank(self, request: Request) -> tuple:
        preempted_first = 0 if request.status == RequestStatus.PREEMPTED else 1
        return (request.priority, preempted_first, request.arrival_time, self._seq[request.request_id])

    # ---- requests in and out ---------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already scheduled")
        if request.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt length ({request.num_tokens}) must be <= max_model_len ({self.config.max_model_len})"
            )
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._seq[request.request_id] = self._next_seq
        self._next_seq += 1
        bisect.insort(self.waiting, request, key=self._waiting_rank)

    def abort_request(self, request_id: str) -> None:
        """Aborts a waiting or running request, freeing its pages now; unknown or finished ids: no-op."""
        self.finish_request(request_id, "abort")

    def finish_request(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> None:
        """Finishes a request from outside ``update()`` (abort, engine-side stop strings); frees its pages."""
        request = self._requests.get(request_id)
        if request is None:
            return
        status = RequestStatus.from_finish_reason(reason)
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status, stop_reason)
        self._finished_ids.append(request_id)

    def _finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """Marks finished and frees pages; the caller has already taken it out of running / waiting."""
        request.drop_pending_tokens()  # sampled after the stop: discarded
        request.set_finished(status, stop_reason)
        self.kv_cache.free(request)
        if self.adapters is not None:
            self.adapters.release(request)
        del self._requests[request.request_id]
        del self._seq[request.request_id]

    def _preempt(self, request: Request) -> None:
        """Drops its pages (their cached copies stay findable: see the module docstring), keeps its outputs,
        waits at the front of its priority."""
        self.kv_cache.free(request, offload=self.config.preemption_mode == SWAP)
        if self.adapters is not None:
            self.adapters.release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=self._waiting_rank)

    def requeue_all(self) -> None:
        """Every running request back to waiting to be recomputed, tokens still on the device dropped (a failed
        step's results never arrive); their pages are free (refcount 0) afterwards."""
        requeued = list(self.running)
        self.running.clear()
        for request in requeued:
            self._reset_in_flight(request)
            self._preempt(request)
        for request in self.waiting:  # preempted earlier while a token was on the way
            self._reset_in_flight(request)

    @staticmethod
    def _reset_in_flight(request: Request) -> None:
        request.drop_pending_tokens()
        request.awaiting_verification = False
        request.chained = False
        request.draft_token_ids = []

    # ---- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.suspects.intersection_update(self._requests)  # finished meanwhile (aborted, refused)
        if self.suspects:
            return self._schedule_isolated()
        budget = self.token_budget
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []

        # 1. Running requests, most important first.
        i = 0
        decoding: list[int] = []  # chunks of one-token decodes whose requests carry drafts
        chaining: list[Request] = []  # requests whose step is on the device, chained to it (jserve.speculative.chain)
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if self._awaits_last_token(request) or self._awaits_verification(request):
                if request.chain_drafts and not self._awaits_last_token(request):
                    chaining.append(request)
                i += 1
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = self._chunk_len(remaining, budget)
            if num_new > 0 and self._make_room(request, num_new, preempted):
                chunks.append(self._make_chunk(request, num_new))
                budget -= num_new
                if remaining == 1 and request.draft_token_ids:
                    decoding.append(len(chunks) - 1)
            i += 1  # NOTE: _make_room only pops from the end, so running[:i] is untouched

        # 2. Drafts, once every running request has its pages: only from budget and pages left over, so a draft
        # never takes a page a plain decode needed (drafts never cause a preemption).
        for index in decoding:
            request = self._requests[chunks[index].request_id]
            num_drafts = len(request.draft_token_ids)
            if num_drafts <= budget and self.kv_cache.allocate(request, 1 + num_drafts):
                chunks[index] = self._make_chunk(request, 1 + num_drafts, num_drafts)
                budget -= num_drafts
        for request in chaining:
            if request.status == RequestStatus.RUNNING and 1 + request.chain_drafts <= budget:
                chunk = self._chained_chunk(request)
                if chunk is not None:
                    chunks.append(chunk)
                    budget -= len(chunk.token_ids)

        # 3. Waiting requests, unless the pool was just too tight for the running ones.
        if not preempted:
            budget = self._admit(budget, chunks)

        finished_ids, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            chunks=chunks,
            num_batched_tokens=self.token_budget - budget,
            preempted_ids=[r.request_id for r in preempted],
            finished_ids=finished_ids,
        )

    def _schedule_isolated(self) -> SchedulerOutput:
        """A step of one suspect alone: its next chunk, admitted from waiting (no leader waits, no other
        admissions). Suspects are always waiting here: ``requeue_all`` put them there, and one that passes its
        step stops being a suspect. Running requests that are not suspects sit it out, and give up their pages
        (or their sequence slot) when the suspect needs them."""
        request = min((self._requests[r] for r in self.suspects), key=self._rank)
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        cached, num_cached = self.kv_cache.find_cached_prefix(request)
        num_new = self._chunk_len(request.num_tokens - num_cached, self.token_budget)
        while (
            len(self.running) >= self.config.max_num_seqs
            or not self._take_adapter(request)
            or not self.kv_cache.allocate(request, num_new, cached)
        ):
            if not self.running:  # the whole pool cannot hold it
                self.waiting.remove(request)
                self._finish(request, RequestStatus.FINISHED_LENGTH)
                self._finished_ids.append(request.request_id)
                break
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
        else:
            self.waiting.remove(request)
            chunks.append(self._start(request, num_cached, num_new))
        finished_ids, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            chunks=chunks,
            num_batched_tokens=sum(len(c.token_ids) for c in chunks),
            preempted_ids=[r.request_id for r in preempted],
            finished_ids=finished_ids,
        )

    def _chained_chunk(self, request: Request) -> ScheduledChunk | None:
        """The request's next verification, chained to its step on the device: laid out as if that step accepted
        every draft it verifies, with pages for that; None when the pool cannot spare them (it waits a step)."""
        assumed = request.in_flight_drafts if request.awaiting_verification else 0
        num_drafts = request.chain_drafts
        if not self.kv_cache.allocate(request, assumed + 1 + num_drafts):
            return None
        request.chained = True
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=[PENDING_TOKEN] + [0] * num_drafts,
            start_pos=request.num_computed_tokens + assumed,
            block_table=list(self.kv_cache.block_table(request.request_id)),
            sample=True,
            prompt_logprobs=False,
            num_drafts=num_drafts,
            chain_assumed=assumed,
        )

    def attach_chained(self, chunk: ScheduledChunk) -> ScheduledChunk | None:
        """The step before a chained chunk reported: the chunk as the device ran it (its first token known, its
        positions moved back by the drafts that step rejected), applied as ``advance`` would have; None when
        its request stopped meanwhile (the device's work for it is discarded)."""
        request = self._requests.get(chunk.request_id)
        if request is None or not request.chained:
            return None
        request.chained = False
        if request.status != RequestStatus.RUNNING or request.num_pending_tokens or request.awaiting_verification:
            return None
        start = request.num_computed_tokens  # its last token's: the one the chained row begins with
        request.num_computed_tokens += 1
        request.awaiting_verification = True
        request.in_flight_drafts = chunk.num_drafts
        self.kv_cache.trim(request, start + 1 + chunk.num_drafts)
        self.kv_cache.cache_computed_pages(request)
        return dataclasses.replace(
            chunk,
            token_ids=[request.all_token_ids[start], *chunk.token_ids[1:]],
            start_pos=start,
            block_table=list(self.kv_cache.block_table(request.request_id)),
        )

    def without_chained(self, output: SchedulerOutput) -> SchedulerOutput:
        """The same step without its chained chunks (their requests wait a step), their extra pages given back."""
        chunks = []
        for chunk in output.chunks:
            if chunk.chain_assumed < 0:
                chunks.append(chunk)
                continue
            request = self._requests[chunk.request_id]
            request.chained = False
            self.kv_cache.trim(request, chunk.start_pos)
        return dataclasses.replace(output, chunks=chunks, num_batched_tokens=sum(len(c.token_ids) for c in chunks))

    def without_drafts(self, output: SchedulerOutput) -> SchedulerOutput:
        """The same step decoding plainly: drafts dropped and their pages given back (a step too large for the
        verification programs)."""
        output = self.without_chained(output)
        chunks = []
        for chunk in output.chunks:
            if chunk.num_drafts:
                request = self._requests[chunk.request_id]
                chunk = dataclasses.replace(chunk, token_ids=chunk.token_ids[: -chunk.num_drafts], num_drafts=0)
                self.kv_cache.trim(request, chunk.start_pos + len(chunk.token_ids))
                chunk = dataclasses.replace(chunk, block_table=list(self.kv_cache.block_table(request.request_id)))
            chunks.append(chunk)
        return dataclasses.replace(output, chunks=chunks, num_batched_tokens=sum(len(c.token_ids) for c in chunks))

    def _make_room(self, request: Request, num_new: int, preempted: list[Request]) -> bool:
        """Pages for ``num_new`` more tokens, preempting from the least important end of running as needed.

        False when ``request`` itself had to go: preempted, or finished with "length" if it is alone (then
        nobody else holds a page it could wait for: its sequence has outgrown the whole pool).
        """
        while not self.kv_cache.allocate(request, num_new):
            victim = self.running.pop()
            if victim is not request:
                self._preempt(victim)
                preempted.append(victim)
                continue
            if self.running:
                self._preempt(request)
                preempted.append(request)
            else:
                self._finish(request, RequestStatus.FINISHED_LENGTH)
                self._finished_ids.append(request.request_id)
            return False
        return True

    def _chunk_len(self, remaining: int, budget: int) -> int:
        """Tokens to run now out of ``remaining``: all, else the budget if chunking is on, else none."""
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _admit(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        """Admits waiting requests in order; returns the budget left."""
        kv = self.kv_cache
        # Leaders that finished their prompt (or left running) no longer hold anyone back.
        self._leaders = {
            h: r
            for h, r in self._leaders.items()
            if r.status == RequestStatus.RUNNING and r.num_computed_tokens < r.num_prompt_tokens
        }
        deferred: list[Request] = []
        # a request parked too long for an adapter slot: requests that would take slots wait behind it
        starving = self.adapters is not None and self.adapters.starving(self.waiting)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_pending_tokens or request.awaiting_verification:  # preempted while tokens are on the way
                deferred.append(self.waiting.pop(0))
                continue
            if kv.pages_needed(request.num_tokens) > kv.pages_total:
                # NOTE: it could never compute its tokens even with the whole pool: finish, never block.
                self.waiting.pop(0)
                self._finish(request, RequestStatus.FINISHED_LENGTH)
                self._finished_ids.append(request.request_id)
                continue
            if starving and request.lora_request is not None and request.lora_wait_since is None:
                deferred.append(self.waiting.pop(0))
                continue
            cached, num_cached = kv.find_cached_prefix(request)
            lead_key = kv.page_hashes(request, 1)[0] if kv.max_cached_pages(request) > 0 else None
            if lead_key is not None and self._must_wait_for_leader(request, lead_key):
                deferred.append(self.waiting.pop(0))
                continue
            if not self._take_adapter(request):  # every adapter slot is in use: others may still run
                deferred.append(self.waiting.pop(0))
                continue
            num_new = self._chunk_len(request.num_tokens - num_cached, budget)
            if num_new == 0 or not kv.allocate(request, num_new, cached):
                if self.adapters is not None:
                    self.adapters.release(request)
                break  # FCFS: the head waits for budget or pages rather than being overtaken
            self.waiting.pop(0)
            if lead_key is not None and lead_key not in self._leaders:
                self._leaders[lead_key] = request
            chunks.append(self._start(request, num_cached, num_new))
            budget -= num_new
        for request in deferred:
            bisect.insort(self.waiting, request, key=self._waiting_rank)
        return budget

    def _start(self, request: Request, num_cached: int, num_new: int) -> ScheduledChunk:
        """Moves an admitted request (pages allocated) from waiting to running; returns its first chunk."""
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.time()
            request.num_cached_tokens = num_cached
        request.num_computed_tokens = num_cached
        request.status = RequestStatus.RUNNING
        bisect.insort(self.running, request, key=self._rank)
        return self._make_chunk(request, num_new)

    def _take_adapter(self, request: Request) -> bool:
        """Multi-LoRA: the request holds its adapter's device slot (loaded into an idle one if not resident);
        False while every slot is in use. A request that is then not admitted gives it back."""
        return self.adapters is None or self.adapters.try_acquire(request)

    def _must_wait_for_leader(self, request: Request, first_page: bytes) -> bool:
        """Prefix sharing: True while the leader of this first page has not computed the pages we share.

        NOTE: leaders are running and make progress every step they get budget, and the wait ends when the
        leader's prompt is computed or it leaves running, so a request is never deferred forever.
        """
        leader = self._leaders.get(first_page)
        if leader is None:
            return False
        kv = self.kv_cache
        mine = kv.page_hashes(request, kv.max_cached_pages(request))
        theirs = kv.page_hashes(leader, min(len(mine), leader.num_prompt_tokens // kv.page_size))
        shared = 0
        while shared < len(theirs) and mine[shared] == theirs[shared]:
            shared += 1
        return leader.num_computed_tokens < shared * kv.page_size

    def _awaits_last_token(self, request: Request) -> bool:
        """Its final token (max_tokens or max_model_len) is pending: nothing left to schedule (async only)."""
        return request.num_pending_tokens > 0 and (
            request.num_sampled >= request.sampling_params.max_tokens or request.num_tokens >= self.config.max_model_len
        )

    def _awaits_verification(self, request: Request) -> bool:
        """Speculative decoding: its verification step is on the device, or it should draft (the policy chose
        it) while its last token is still pending; its next draft needs the tokens, so it sits this step out."""
        if request.awaiting_verification:
            return True
        return self.speculating and request.num_pending_tokens > 0 and request.wants_drafts

    def _make_chunk(self, request: Request, num_new: int, num_drafts: int = 0) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new - num_drafts
        is_decode = request.num_sampled > 0 and start == request.num_tokens - 1
        if not is_decode:
            self.prompt_tokens_computed += num_new
            if request.num_preemptions:  # computed before, freed by preemption, computed again
                self.prompt_tokens_recomputed += num_new
        token_ids = request.all_token_ids[start:end]
        if num_drafts:
            token_ids = token_ids + request.draft_token_ids[:num_drafts]
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=token_ids,
            start_pos=start,
            block_table=list(self.kv_cache.block_table(request.request_id)),
            num_drafts=num_drafts,
            sample=end == request.num_tokens,
            prompt_logprobs=(
                request.sampling_params.prompt_logprobs is not None
                and request.num_sampled == 0
                and start < request.num_prompt_tokens
            ),
        )

    # ---- after the step --------------------------------------------------------------------------------
    def update(
        self,
        output: SchedulerOutput,
        sampled: dict[str, int],
        verified: dict[str, list[int]] | None = None,
        drafted: dict[str, int] | None = None,
    ) -> list[Request]:
        """Applies a finished step (synchronous scheduling): ``advance`` then ``resolve``."""
        self.advance(output)
        return self.resolve(output, sampled, verified, drafted)

    def advance(self, output: SchedulerOutput) -> None:
        """The step's tokens are computed (or will be, once the dispatched step runs: any later step that reads
        them runs after it on the device); every sampling chunk gets a pending token. Pages full of computed
        tokens enter the prefix cache now, so requests waiting for a leader's prefix hit it in the very next
        step; a page holding a pending token waits for ``resolve`` (hashes cover known tokens only)."""
        for chunk in output.chunks:
            request = self._requests.get(chunk.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished (aborted) between schedule() and now
            if chunk.chain_assumed >= 0:
                continue  # applied once the step before it reports (attach_chained)
            if chunk.num_drafts:  # the drafts' K/V count once verified (resolve)
                request.num_computed_tokens += len(chunk.token_ids) - chunk.num_drafts
                request.awaiting_verification = True
                request.in_flight_drafts = chunk.num_drafts
            else:
                request.num_computed_tokens += len(chunk.token_ids)
                if chunk.sample:
                    request.add_pending_token()
            self.kv_cache.cache_computed_pages(request)

    def resolve(
        self,
        output: SchedulerOutput,
        sampled: dict[str, int],
        verified: dict[str, list[int]] | None = None,
        drafted: dict[str, int] | None = None,
    ) -> list[Request]:
        """The step's sampled tokens arrived: they replace the pending tokens, then token-level stops apply.
        ``verified``: per speculating request, its accepted drafts plus the target's next token; ``drafted``:
        how many drafts it verified, where the device chose (chained rows). Returns the requests that got new
        tokens, in chunk order."""
        new_token_requests: list[Request] = []
        finished: list[tuple[Request, RequestStatus, int | None]] = []
        now = time.time()
        for chunk in output.chunks:
            request = self._requests.get(chunk.request_id)
            if chunk.num_drafts:
                if request is None or not request.awaiting_verification:
                    continue  # finished (aborted) since the step was scheduled
                num_drafts = (drafted or {}).get(chunk.request_id, chunk.num_drafts)
                self._apply_verified(request, num_drafts, verified[chunk.request_id])
            elif request is None or (chunk.sample and not request.num_pending_tokens):
                continue  # finished (aborted, stopped) since the step was scheduled
            elif chunk.sample:
                request.resolve_pending_token(sampled[chunk.request_id])
            if request.status == RequestStatus.RUNNING:
                self.kv_cache.cache_computed_pages(request)
            if not chunk.sample:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            new_token_requests.append(request)
            status, stop_reason = self._check_stop(request)
            if status is not None:
                finished.append((request, status, stop_reason))
        for request, status, stop_reason in finished:
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:  # preempted while its last token was on the way
                self.waiting.remove(request)
            self._finish(request, status, stop_reason)
        return new_token_requests

    def _apply_verified(self, request: Request, num_drafts: int, tokens: list[int]) -> None:
        """Appends the verified tokens (up to a token-level stop); the accepted drafts' K/V become computed and
        the rejected drafts' slots go back (a page they alone used returns to the pool; a chained chunk still
        on the device keeps its pages until it is attached)."""
        request.awaiting_verification = False
        accepted = len(tokens) - 1
        appended = request.append_verified_tokens(tokens, lambda r: self._check_stop(r)[0] is not None)
        request.num_draft_tokens += num_drafts
        request.last_accepted = min(accepted, appended)  # drafts after a stop token inside the run are dropped
        request.num_accepted_tokens += request.last_accepted
        if request.status == RequestStatus.RUNNING:  # not preempted while the step ran
            request.num_computed_tokens += min(accepted, appended)
            if not request.chained:
                self.kv_cache.trim(request, request.num_computed_tokens)

    def _check_stop(self, request: Request) -> tuple[RequestStatus | None, int | None]:
        """Token-level stops after a token was resolved. Stop strings are the engine's (finish_request)."""
        params = request.sampling_params
        token = request.output_token_ids[-1]
        # NOTE: eos and stop tokens only count once min_tokens outputs exist; the sampler should mask them
        # before that (vLLM does), this is the backstop.
        if request.num_output_tokens >= params.min_tokens:
            if token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        num_known = request.num_tokens - request.num_pending_tokens
        if request.num_output_tokens >= params.max_tokens or num_known >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None
