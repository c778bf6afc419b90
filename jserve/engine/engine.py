"""Engine: inbox (add/abort) -> schedule -> build -> run -> update -> stream deltas.

Concurrency story: the Engine itself is single-threaded — only the thread that calls ``step()`` touches the
scheduler, the page pool and the device. Other threads talk to it through one thread-safe hand-off, the inbox
(``add_request`` / ``abort_request`` enqueue; ``step()`` drains it first). ``AsyncLLM`` runs ``step()`` on its own
engine thread and hands deltas back to the asyncio loop with ``call_soon_threadsafe`` (the second hand-off);
``LLM`` calls ``step()`` in the caller's thread. A request with ``n > 1`` becomes n sequences ``{id}-{i}`` that
share the prompt's pages through the prefix cache; their deltas are reported under the parent id.

``step()`` is ``begin_step()`` (inbox, schedule, build, dispatch to the device) then ``finish_step()`` (wait, update
the scheduler, build deltas); ``DataParallelEngine`` dispatches every replica before finishing any. In a multi-host
job ``inbox_sync`` makes every process apply the leader's inbox, so all of them run the same steps.

Async scheduling (the default with one pipeline stage): ``begin_step`` schedules step N+1 while step N is still
on the device, its sampled tokens pending (``Scheduler.advance``); the device reads them from N's outputs, and
``finish_step`` then waits for N, resolves its tokens (``Scheduler.resolve``) and builds N's deltas while N+1
computes. A request that a late-found stop ends has computed one token too many, which is discarded.
Structured outputs keep the lookahead: a step with a constrained row whose last token is pending runs its
forward at once and defers its sampling, which ``finish_step`` queues once the previous step's tokens have
reached the grammars and the masks are filled (the device computes the forward meanwhile); without deferred
sampling (speculative decoding) the engine steps synchronously while a constrained request is live.
Speculative decoding keeps it too: a request's next verification is chained to the one still on the device,
which the device makes exact and drafts for itself, by an n-gram lookup or the drafter's k steps
(``jserve.speculative.chain``); a request with penalties or a grammar sits a step out instead, its next step
needing its last token on the host first.

Failure isolation: an exception while building, dispatching or collecting a step does not end the engine.
Every running request goes back to waiting to be recomputed (tokens still on the device are dropped, the
prefix cache is cleared, KV pages a failed device step left unusable are allocated anew), and the requests of
the failed step become suspects, each run alone in a step of its own (synchronously) until it passes one. A
request that fails a step alone, or is in ``MAX_STEP_FAILURES`` failed steps, is refused: its samples finish
with "error" and ``RequestOutput.error`` says why (HTTP 500 / gRPC INTERNAL for it alone). A request whose own
host work (detokenizing, stop strings, grammar) raises is refused at once. ``num_step_failures`` counts the
failed steps. An exception outside a step (the scheduler itself) still ends the engine.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jserve import compile_watch
from jserve.engine.batch import StepPlan, build_step, fill_deferred_masks
from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.output import RequestGroup, SampleState
from jserve.engine.request import Request, RequestStatus
from jserve.engine.runner import ModelRunner, PendingStep, StepResult
from jserve.engine.scheduler import Scheduler, SchedulerOutput
from jserve.limits import RequestLimits, RequestTooLargeError, check_token_count, pages_needed
from jserve.lora.request import LoRARequest
from jserve.outputs import RequestOutput
from jserve.parallel.multihost import STOP
from jserve.sampling_params import SamplingParams
from jserve.speculative.config import DRAFT, SpeculativeConfig
from jserve.speculative.controller import SpeculationController

if TYPE_CHECKING:
    from jserve.kv_offload.offloader import KVOffloader
    from jserve.lora.peft_adapter import HostAdapter
    from jserve.structured import CompiledGrammar, GrammarCompiler
    from jserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_STEP_FAILURES = 3  # a request in this many failed steps is refused, even if it never failed one alone

FaultInjector = Callable[[str, list[str]], None]
"""Test hook: called as ``hook(phase, sequence_ids)`` with phase "dispatch" (before the step goes to the device)
or "collect" (before its results are read); raising there fails the step as a real fault would."""


@dataclass
class _Step:
    """A step between begin_step and finish_step."""

    sched: SchedulerOutput
    plans: list[StepPlan] | None = None
    pending: PendingStep | None = None
    advanced: bool = False  # async scheduling: the scheduler counts its tokens as pending until it is finished
    sampling_deferred: bool = False  # its logits are queued, its sampling waits for grammar masks (see _sample)
    failure: Exception | None = None  # building or dispatching it raised (see Engine._recover)
    chained: bool = False  # holds rows chained to the step before it, attached once that one reports


_NOTHING = SchedulerOutput(chunks=[], num_batched_tokens=0)


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    stream: bool = True
    lora_request: LoRARequest | None = None
    lora_adapter: HostAdapter | None = None  # its host copy, read on the caller's thread


def _charging_lowerings(method):
    """Programs lowered inside the call count as this engine's (``programs_lowered_while_serving``)."""

    @functools.wraps(method)
    def charged(self, *args, **kwargs):
        with self._lowerings.active():
            return method(self, *args, **kwargs)

    return charged


class Engine:
    """Drives the scheduler and the model runner one step at a time (see the module docstring)."""

    def __init__(
        self,
        *,
        runner: ModelRunner,
        scheduler: Scheduler,
        kv_cache: KVCacheManager,
        tokenizer: Tokenizer | None,
        eos_token_ids: Sequence[int],
        vocab_size: int,
        max_model_len: int,
        limits: RequestLimits | None = None,
        seed: int = 0,
        async_scheduling: bool = True,
        speculative: SpeculativeConfig | None = None,
        grammar: GrammarCompiler | None = None,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.kv_cache = kv_cache
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.limits = limits if limits is not None else RequestLimits(max_n=scheduler.config.max_num_seqs)
        self.seed = seed
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._groups: dict[str, RequestGroup] = {}
        self._seq_to_group: dict[str, str] = {}
        self._sequences: dict[str, Request] = {}
        self._seeds: dict[str, int] = {}
        self._auto_ids = itertools.count()
        self._seed_counter = itertools.count()
        self._ids_lock = threading.Lock()
        self._live_ids: set[str] = set()  # ids added and not yet fully reported, across threads
        self.num_steps = 0
        self._late: dict[str, set[str]] = {}  # group -> samples whose final delta is due at the next emit
        self._unreported: set[str] = set()  # groups that may have finished (``_collect_finished``)
        # async scheduling: the step dispatched last, whose tokens the host has not seen (one pipeline stage only:
        # a microbatched step has no single row order for the next step to read from)
        self.async_scheduling = async_scheduling and runner.num_stages == 1
        # structured outputs keep the lookahead: a step whose constrained rows' last tokens are pending samples
        # in a second program once the host has their masks (ModelRunner.defers_sampling)
        self._defer_grammar = self.async_scheduling and runner.defers_sampling and speculative is None
        self._in_flight: _Step | None = None
        self.inbox_sync = None  # multi-host: set to jserve.parallel.multihost.broadcast_items
        self.stopped = False
        self.speculative = speculative
        self._speculation = (
            SpeculationController(speculative, runner.step_costs, max_model_len) if speculative is not None else None
        )
        self.num_draft_tokens = 0  # speculative decoding: drafts verified, accepted, and rows that drafted
        self.num_accepted_tokens = 0
        self.num_drafting_rows = 0
        # structured outputs: compiles grammars off this thread; add_request leaves each request's compiled
        # grammar here for _admit (multi-host followers, which have none, compile it from the specification)
        self.grammar = grammar
        self._compiled: dict[str, CompiledGrammar] = {}
        self.num_step_failures = 0
        self.fault_injector: FaultInjector | None = None
        self._lowerings = compile_watch.LoweringCounter()  # programs lowered inside this engine's steps
        self.offloader: KVOffloader | None = None  # the host tier's copies (kv_offloading_size)

    def mark_ready(self) -> None:
        """Every program is compiled: lowerings in its steps from now on count as
        ``programs_lowered_while_serving``."""
        self._lowerings.count = 0

    # ------------------------------------------------------------------ inbox (thread-safe)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises ValueError for a request the engine can never serve, or one over the admission limits
        (``RequestTooLargeError`` when its samples could never hold their pages at once). Every check costs
        time bounded by the limits, whatever sizes the request carries."""
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        check_token_count("prompt", prompt_token_ids, self.max_model_len)
        self.limits.check_sampling(params)
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}")
        bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids: ids outside the vocabulary [0, {self.vocab_size}): {bad_stop[:8]}")
        needed = pages_needed(
            len(prompt_token_ids),
            params,
            max_model_len=self.max_model_len,
            page_size=self.kv_cache.page_size,
            shared=self.kv_cache.enable_prefix_caching and params.prompt_logprobs is None,
        )
        if needed > self.kv_cache.pages_total:
            raise RequestTooLargeError(
                f"n: {params.n} samples of up to {min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)}"
                f" tokens need {needed} KV pages at once; the pool has {self.kv_cache.pages_total}"
                " (lower n or max_tokens)"
            )

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        prompt: str | None = None,
        arrival_time: float | None = None,
        stream: bool = True,
        grammar: CompiledGrammar | None = None,
        lora_request: LoRARequest | None = None,
        lora_adapter: HostAdapter | None = None,
    ) -> str:
        """Validates and enqueues a request; returns its id. Safe to call from any thread.

        Structured outputs: ``grammar`` is the request's compiled grammar (``AsyncLLM`` awaits it on its loop);
        without it, this call compiles it and waits up to the compiler's timeout.

        ``stream=False``: no per-step deltas, one RequestOutput holding everything when the request finishes
        (vLLM's FINAL_ONLY; offline ``LLM.generate`` uses it: building 64 deltas a step costs ~10% of a small
        model's step on CPU).

        ``lora_request``: run with this PEFT adapter (``enable_lora``); it is read (and checked) here, on the
        caller's thread, unless the engine holds it already or ``lora_adapter`` is its copy from
        ``register_adapter``."""
        params.validate()
        self.validate(prompt_token_ids, params)
        adapter = lora_adapter if lora_adapter is not None else self.register_adapter(lora_request)
        if params.structured_outputs is not None and grammar is None:
            grammar = self.compile_grammar(params)  # this thread waits (bounded), never the engine's
        request_id = request_id if request_id is not None else f"req-{next(self._auto_ids)}"
        with self._ids_lock:
            if request_id in self._live_ids:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._live_ids.add(request_id)
            if grammar is not None:
                self._compiled[request_id] = grammar
        arrival = time.time() if arrival_time is None else arrival_time
        self._inbox.put(
            _Add(request_id, prompt, [int(t) for t in prompt_token_ids], params, arrival, stream, lora_request, adapter)
        )
        return request_id

    def register_adapter(self, lora_request: LoRARequest | None) -> HostAdapter | None:
        """The adapter's host copy, read (and checked) unless the host tier holds it; ValueError when it cannot
        be served. Any thread."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a jserve.LoRARequest, got {type(lora_request).__name__}")
        if self.scheduler.adapters is None:
            raise ValueError("lora_request: this engine serves no adapters (start it with enable_lora=True)")
        return self.scheduler.adapters.register(lora_request)

    def unload_adapter(self, lora_int_id: int) -> None:
        """Drops an adapter from the host tier and its device slot; requests running with it finish. Any thread."""
        if self.scheduler.adapters is not None:
            self.scheduler.adapters.forget(lora_int_id)

    def compile_grammar(self, params: SamplingParams) -> CompiledGrammar:
        """The compiled grammar of ``params.structured_outputs``, waiting at most the compiler's timeout;
        ValueError naming ``structured_outputs`` if it cannot be compiled."""
        return self.grammar_compiler().compile(params.structured_outputs)

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-outputs compiler; ValueError when the model has no tokenizer to compile over."""
        if self.grammar is None:
            raise ValueError("structured_outputs: this model has no tokenizer, which grammars are compiled over")
        return self.grammar

    def _next_seed(self) -> int:
        """Seeds for requests without one: distinct per request, reproducible from the engine seed."""
        return (self.seed * 1_000_003 + next(self._seed_counter) * 7919) & 0x7FFFFFFF

    def abort_request(self, request_id: str) -> None:
        """Aborts a request (all its samples); its pages are freed at the next step. Any thread."""
        self._inbox.put(request_id)

    def _drain_inbox(self) -> None:
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        if self.inbox_sync is not None:  # multi-host: every process applies the leader's inbox
            items = self.inbox_sync(items)
        for item in items:
            if isinstance(item, _Add):
                self._admit(item)
            elif item == STOP:
                self.stopped = True
            else:
                self._abort(item)

    def step_following(self) -> bool:
        """Multi-host follower: one lockstep step; False once the leader said stop."""
        self.step()
        return not self.stopped

    def broadcast_stop(self) -> None:
        """Multi-host leader: step until the inbox carrying STOP has been broadcast (a step already dispatched
        ahead completes first), so the followers leave their loop."""
        self._inbox.put(STOP)
        while not self.stopped:
            self.step()

    def _admit(self, add: _Add) -> None:
        samples = {}
        compiled = None
        if add.params.structured_outputs is not None:
            with self._ids_lock:
                compiled = self._compiled.pop(add.request_id, None)
            if compiled is None:  # a multi-host follower: the leader checked it compiles
                compiled = self.compile_grammar(add.params)
        for i in range(add.params.n):
            seq_id = add.request_id if add.params.n == 1 else f"{add.request_id}-{i}"
            request = Request(
                seq_id,
                add.prompt_token_ids,
                add.params,
                eos_token_ids=self.eos_token_ids,
                arrival_time=add.arrival_time,
                lora_request=add.lora_request,
            )
            request.lora_adapter = add.lora_adapter
            if compiled is not None:
                request.grammar = compiled.new_state()
            detok = None
            if self.tokenizer is not None:
                detok = self.tokenizer.detokenizer(add.prompt_token_ids, add.params.skip_special_tokens)
            samples[seq_id] = SampleState(index=i, detokenizer=detok)
            self._sequences[seq_id] = request
            self._seq_to_group[seq_id] = add.request_id
            base_seed = add.params.seed if add.params.seed is not None else self._next_seed()
            self._seeds[seq_id] = (base_seed + i) & 0x7FFFFFFF
            self.scheduler.add_request(request)
        self._groups[add.request_id] = RequestGroup(
            add.request_id,
            add.prompt,
            add.prompt_token_ids,
            add.params,
            add.arrival_time,
            samples,
            prompt_logprobs=[None] if add.params.prompt_logprobs is not None else None,
            stream=add.stream,
        )

    def _abort(self, request_id: str) -> None:
        """Aborts the samples still running; their final delta comes with the next emitted step.

        NOTE: deltas are only ever built in ``_emit``, after the step's tokens are applied, so a request that
        finished in the step being emitted and was aborted meanwhile still reports exactly one final delta.
        """
        group = self._groups.get(request_id)
        if group is None:
            return
        for seq_id, sample in group.samples.items():
            request = self._sequences[seq_id]
            if sample.finish_reason is None and not request.is_finished:
                self.scheduler.abort_request(seq_id)
                sample.finish_reason = "abort"
        self._late.setdefault(request_id, set()).update(group.samples)

    # ------------------------------------------------------------------ the step

    def has_unfinished(self) -> bool:
        return bool(self._groups) or not self._inbox.empty() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """One iteration; returns the deltas of every request that changed (see ``begin_step``)."""
        return self.finish_step(self.begin_step())

    @_charging_lowerings
    def begin_step(self) -> _Step:
        """Inbox, schedule, build and dispatch; the device works while the caller does other things (e.g.
        dispatches the other data-parallel replicas) before ``finish_step``.

        With async scheduling the step still on the device (``_in_flight``) has not reported its tokens yet:
        this step is scheduled with them pending, and reads them from that step's outputs on the device.
        """
        self._drain_inbox()
        lookahead = (
            self.async_scheduling and not self.scheduler.suspects and (self._defer_grammar or not self._constrained())
        )
        if self.async_scheduling and not lookahead and self._in_flight is not None:
            return _Step(_NOTHING)  # structured outputs (or suspects) arrived: let the step in flight finish first
        self._draft(lookahead)
        self.scheduler.token_budget = self.runner.ready_shapes.token_buckets[-1]  # only programs that exist
        sched = self.scheduler.schedule()
        if self.speculative is not None and not self._verifiable(sched):
            sched = self.scheduler.without_drafts(sched)
        elif not self._chainable(sched):
            sched = self.scheduler.without_chained(sched)
        self._finished_by_scheduler(sched.finished_ids)
        if not sched.chunks:
            return _Step(sched)
        try:
            return self._dispatch(sched, lookahead)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the engine
            return _Step(sched, failure=exc)

    def _dispatch(self, sched: SchedulerOutput, lookahead: bool) -> _Step:
        """Builds the step's inputs and queues it on the device."""
        previous = self._in_flight
        previous_rows = None
        if previous is not None:
            self._sample(previous)  # (already queued, unless a path skipped finish_step's)
            previous_rows = {rid: i for i, rid in enumerate(previous.plans[0].sampled_ids)}
        plans = [
            build_step(
                part,
                self._sequences,
                self.runner.ready_shapes,
                lambda r: self._seeds[r.request_id],
                self._banned_ids,
                previous_rows,
                device_drafts=self.speculative is not None and self.speculative.samples_drafts,
                run_draft=self.scheduler.speculating,
                defer_grammar=self._defer_grammar and lookahead,
            )
            for part in self._microbatches(sched)
        ]
        if self.speculative is not None and self.speculative.method == DRAFT and not self.scheduler.speculating:
            for chunk in sched.chunks:  # computed without the draft model: its K/V for them are missing
                self._sequences[chunk.request_id].draft_synced = False
        if self.fault_injector is not None:
            self.fault_injector("dispatch", [c.request_id for c in sched.chunks])
        self._write_adapters()
        if self.offloader is not None:  # evicted pages out before the step overwrites them, restored ones in
            self.offloader.flush(*self.kv_cache.take_transfers())
        step = _Step(sched, plans, self.runner.dispatch(plans, previous.pending if previous else None))
        step.sampling_deferred = any(plan.defers_sampling for plan in plans)
        step.chained = any(c.chain_assumed >= 0 for c in sched.chunks)
        if lookahead:
            self.scheduler.advance(sched)  # the next schedule sees this step's tokens as pending
            step.advanced = True
        return step

    def _write_adapters(self) -> None:
        """Queues the adapters the scheduler gave slots to, before the step that reads them. A write that fails
        leaves its slot (and those after it) holding no known adapter, and fails the step."""
        adapters = self.scheduler.adapters
        if adapters is None:
            return
        loads = adapters.take_loads()
        for i, (slot, adapter) in enumerate(loads):
            try:
                self.runner.write_lora_slot(slot, adapter)
            except Exception:
                for unwritten, _ in loads[i:]:
                    adapters.unwritten(unwritten)
                raise

    def _constrained(self) -> bool:
        """Some live request has structured outputs. Its next mask needs its last token on the host: without
        deferred sampling (speculative decoding, pipeline stages, several processes) the engine then steps
        synchronously, so a constrained request never has a pending token when it is scheduled."""
        return self.grammar is not None and any(r.grammar is not None for r in self._sequences.values())

    def _sample(self, step: _Step | None) -> None:
        """Queues a deferred step's sampling with its masks, filled from its requests' grammars, which have seen
        every earlier token by now (the previous step was reported). The device ran the step's forward while
        the host reported the previous step and filled these masks."""
        if step is None or not step.sampling_deferred:
            return
        step.sampling_deferred = False
        (plan,) = step.plans
        self.runner.sample_deferred(step.pending, fill_deferred_masks(plan, self._sequences))

    def _chainable(self, sched: SchedulerOutput) -> bool:
        """Chained rows need the layout-only attention metadata of short steps (the device edits it), which a
        step with a longer chunk (a prefill) does not get."""
        longest = max((len(c.token_ids) for c in sched.chunks), default=0)
        return self.speculative is None or longest <= self.runner.shapes.num_spec_tokens + 1

    def _may_chain(self, request: Request) -> bool:
        """Drafts made on the device (an n-gram lookup or the drafter's steps), in a row chained to the request's
        step still there: not for grammars (masks need the tokens on the host) or penalties (their history would
        need them too)."""
        params = request.sampling_params
        return (
            request.grammar is None
            and not request.chained
            and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0
        )

    def _draft(self, lookahead: bool = False) -> None:
        """Speculative decoding: which running requests draft this step, and their drafts (n-gram lookups here;
        the device drafters' are placeholders the device fills in).

        The policy (``SpeculationController``, docs/speculative.md): a step may speculate only while at most
        ``max_batch_size`` sequences run, and then drafts only for the requests whose acceptance estimates make
        the step's expected tokens per second beat a plain step's, by the step costs measured at startup; when
        no request should draft, the step is a plain one and keeps async scheduling's one-step lookahead.
        """
        spec = self.speculative
        if spec is None:
            return
        running = self.scheduler.running
        if not running:
            self._speculation.idle()  # the time until the next step finishes was not all that step's
        # (the draft model runs every step's tokens too while this holds; a waiting request needs its prompt)
        self.scheduler.speculating = len(running) <= spec.max_batch_size and self._speculation.keeps_draft_model(
            [*running, *self.scheduler.waiting]
        )
        chain = lookahead and self.runner.shapes.spec_chain
        self._speculation.plan(
            running, self._may_draft, allowed=self.scheduler.speculating, may_chain=self._may_chain if chain else None
        )

    @staticmethod
    def _may_draft(request: Request) -> bool:
        """Decoding (its last token computed or in flight), past min_tokens (whose banned ids plain steps
        apply), its draft K/V complete, and not opted out."""
        return (
            request.sampling_params.speculative
            and request.draft_synced
            and request.status == RequestStatus.RUNNING
            and request.num_sampled > 0
            and (request.num_computed_tokens == request.num_tokens - 1 or request.awaiting_verification)
            and request.num_sampled >= request.sampling_params.min_tokens
        )

    def _verifiable(self, sched: SchedulerOutput) -> bool:
        """A step with drafts fits the verification programs (rows and tokens); else it decodes plainly."""
        if not any(c.num_drafts for c in sched.chunks):
            return True
        rows = sum(1 for c in sched.chunks if c.sample)
        return self.runner.ready_shapes.verify_bucket(sched.num_batched_tokens, rows) is not None

    @_charging_lowerings
    def finish_step(self, step: _Step) -> list[RequestOutput]:
        """Reports the oldest step on the device: waits for its tokens, updates the scheduler, builds the
        deltas. Synchronous: that is ``step`` itself. Async: the previous step, while ``step`` computes.
        A step that failed (here, or in ``begin_step``) is recovered from (see the module docstring)."""
        if step.failure is not None:  # its building or dispatch raised: the step in flight (if any) is fine
            outputs = self.finish_step(_Step(_NOTHING)) if self._in_flight is not None else []
            self._recover([c.request_id for c in step.sched.chunks], step.failure)
            return outputs + self._emit(_Step(_NOTHING), [])
        if not self.async_scheduling or (step.pending is not None and not step.advanced):
            done = step
        else:
            done, self._in_flight = self._in_flight, step if step.pending is not None else None
            if done is None:
                return self._emit(_Step(_NOTHING), [])
        try:
            updated = self._complete(done)
        except Exception as exc:  # noqa: BLE001 - the device part failed: so does the step queued behind it
            self._recover([c.request_id for c in done.sched.chunks], exc)
            return self._emit(_Step(_NOTHING), [])
        if self._speculation is not None and done.plans:  # what the step cost: the policy's wall-time correction
            # (a verification step's bucket also fits its rows)
            bucket = max(plan.bucket for plan in done.plans)
            self._speculation.observe_finished(any(p.is_verification for p in done.plans), bucket)
        outputs = self._emit(done, updated)
        try:
            self._sample(self._in_flight)  # its grammars have now seen every token before it
        except Exception as exc:  # noqa: BLE001 - filling masks or queueing its sampling failed: that step fails
            failed, self._in_flight = self._in_flight, None
            self._recover([c.request_id for c in failed.sched.chunks], exc)
        return outputs

    def _recover(self, failed_ids: list[str], exc: Exception) -> None:
        """After a failed step: everyone is recomputed from the host's tokens; the failed step's requests become
        suspects (each runs alone next), or are refused if they already failed alone or too often."""
        self.num_step_failures += 1
        alone = len(failed_ids) == 1 and failed_ids[0] in self.scheduler.suspects
        logger.error("step failed (%d requests%s): %r", len(failed_ids), ", alone" if alone else "", exc)
        self._in_flight = None  # its results read the failed step's outputs: never collected
        self.scheduler.requeue_all()
        self.reset_prefix_cache()  # pages the failed step registered may hold garbage (both tiers)
        if not self.runner.kv_cache_usable():
            self.runner.reset_kv_cache()
        for seq_id in failed_ids:
            request = self.scheduler.get_request(seq_id)
            if request is None:
                continue  # finished meanwhile
            request.num_step_failures += 1
            if alone or request.num_step_failures >= MAX_STEP_FAILURES:
                self._refuse(self._seq_to_group[seq_id], f"engine step failed: {exc!r}")
            else:
                self.scheduler.suspects.add(seq_id)

    def _refuse(self, group_id: str, message: str) -> None:
        """Ends every unfinished sample of the request with "error"; its final delta carries ``message``."""
        group = self._groups.get(group_id)
        if group is None:
            return
        group.error = message
        for seq_id, sample in group.samples.items():
            self.scheduler.suspects.discard(seq_id)
            if sample.finish_reason is None:
                self.scheduler.finish_request(seq_id, "error")
                sample.finish_reason = "error"
        self._late.setdefault(group_id, set()).update(group.samples)

    def _complete(self, step: _Step) -> list[tuple[Request, StepResult, int, int]]:
        """Device part: wait for the results, record prompt logprobs, hand the tokens to the scheduler."""
        if step.pending is None:
            return []
        self._sample(step)
        if self.fault_injector is not None:
            self.fault_injector("collect", [c.request_id for c in step.sched.chunks])
        results = self.runner.collect(step.pending)
        self.num_steps += 1
        self.scheduler.suspects.difference_update(c.request_id for c in step.sched.chunks)  # they passed
        rows: dict[str, tuple[StepResult, int]] = {}
        sampled: dict[str, int] = {}
        verified: dict[str, list[int]] = {}
        drafted: dict[str, int] = {}
        for plan, result in zip(step.plans, results, strict=True):
            for i, rid in enumerate(plan.sampled_ids):
                rows[rid] = (result, i)
                tokens = result.emitted(i)
                sampled[rid] = tokens[-1]
                if plan.num_drafts and plan.num_drafts[i]:
                    verified[rid] = tokens
                    drafted[rid] = int(result.spec_num_drafts[i])  # (a chained row's: looked up on the device)
                    request = self._sequences.get(rid)
                    if request is not None and not request.is_finished:  # (else its row is discarded)
                        self._count_verification(request, plan.num_drafts[i], drafted[rid], len(tokens) - 1)
            for prompt_rows in plan.prompt_rows:
                group = self._group_of(prompt_rows.request_id)
                if group is not None:
                    group.record_prompt_logprobs(prompt_rows, result)
        before = {rid: self._sequences[rid].num_output_tokens for rid in verified if rid in self._sequences}
        accepted_before = {rid: self._sequences[rid].num_accepted_tokens for rid in before}
        if step.advanced:
            updated = self.scheduler.resolve(step.sched, sampled, verified, drafted)
        else:
            updated = self.scheduler.update(step.sched, sampled, verified, drafted)
        self._attach_chained()
        for rid, count in accepted_before.items():  # accepted drafts kept (a stop token drops those after it)
            self.num_accepted_tokens += self._sequences[rid].num_accepted_tokens - count
        return [
            (
                request,
                *rows[request.request_id],
                request.num_output_tokens - before[request.request_id] if request.request_id in verified else 1,
            )
            for request in updated
        ]

    def _count_verification(self, request: Request, slots: int, num_drafts: int, num_accepted: int) -> None:
        """A verified row of ``slots`` draft slots and ``num_drafts`` drafts: the engine's counters and the
        request's acceptance estimate (offered: the slots, so a lookup that found nothing counts as rejected
        drafts, as on the host)."""
        if num_drafts:
            self.num_drafting_rows += 1
            self.num_draft_tokens += num_drafts
        request.drafts_offered = max(request.drafts_offered, slots)
        self._speculation.record(request, num_accepted)

    def _attach_chained(self) -> None:
        """The step just reported: the rows of the step after it that were chained to it become exact now that
        their requests' tokens are known (``Scheduler.attach_chained``); their requests stopped: left out."""
        step = self._in_flight
        if step is None or not step.chained:
            return
        step.chained = False
        chunks = step.sched.chunks
        for i, chunk in enumerate(chunks):
            if chunk.chain_assumed >= 0:
                chunks[i] = self.scheduler.attach_chained(chunk) or chunk

    def _emit(self, step: _Step, updated: list[tuple[Request, StepResult, int, int]]) -> list[RequestOutput]:
        """Host part: detokenize, check stop strings, build the deltas."""
        touched: dict[str, list[str]] = {}
        for request, result, row, num_new in updated:
            group_id = self._seq_to_group[request.request_id]
            try:
                self._on_tokens(request, result, row, num_new)
            except Exception as exc:  # noqa: BLE001 - this request's own host work failed: it alone ends
                logger.error("request %s failed on the host: %r", group_id, exc)
                self._refuse(group_id, f"request failed: {exc!r}")
            touched.setdefault(group_id, []).append(request.request_id)
        for chunk in step.sched.chunks:  # prompt logprobs may be ready before any token
            group_id = self._seq_to_group.get(chunk.request_id)
            if chunk.prompt_logprobs and group_id is not None and group_id not in touched:
                touched[group_id] = []
        for group_id, seq_ids in self._late.items():  # aborted or ended by the scheduler
            if group_id in self._groups:
                touched[group_id] = sorted(set(touched.get(group_id, [])) | seq_ids)
        self._late.clear()
        self._unreported.update(touched)  # (before the deltas: a delta that raises leaves them to the next emit)
        outputs = []
        for group_id, seq_ids in touched.items():
            group = self._groups[group_id]
            if not group.stream:  # final only: one output with every sample, once all have finished
                if not group.finished:
                    continue
                seq_ids = list(group.samples)
            outputs.append(self._delta(group, seq_ids))
        self._collect_finished()
        return outputs

    def _group_of(self, seq_id: str) -> RequestGroup | None:
        group_id = self._seq_to_group.get(seq_id)
        return None if group_id is None else self._groups[group_id]

    def _microbatches(self, sched: SchedulerOutput) -> list[SchedulerOutput]:
        """One part per pipeline stage (disjoint sequences, balanced by tokens) so every stage has work."""
        parts = min(self.runner.num_stages, len(sched.chunks))
        if parts <= 1:
            return [sched]
        target = sched.num_batched_tokens / parts
        groups: list[list] = [[]]
        filled = 0
        for chunk in sched.chunks:
            if filled >= target * len(groups) and len(groups) < parts:
                groups.append([])
            groups[-1].append(chunk)
            filled += len(chunk.token_ids)
        return [
            dataclasses.replace(sched, chunks=g, num_batched_tokens=sum(len(c.token_ids) for c in g))
            for g in groups
            if g
        ]

    def _finished_by_scheduler(self, seq_ids: list[str]) -> None:
        """Requests the scheduler ended on its own (e.g. too long for the whole page pool); reported with the
        next emitted step (see ``_abort``)."""
        for seq_id in seq_ids:
            group = self._group_of(seq_id)
            if group is None or group.samples[seq_id].finish_reason is not None:
                continue  # the engine finished it itself (abort, stop string)
            request = self._sequences[seq_id]
            group.samples[seq_id].finish_reason = request.finish_reason
            group.samples[seq_id].stop_reason = request.stop_reason
            self._late.setdefault(group.request_id, set()).add(seq_id)

    def _banned_ids(self, request: Request) -> list[int]:
        params = request.sampling_params
        if request.num_sampled >= params.min_tokens:
            return []
        return list(request.eos_token_ids) + list(params.stop_token_ids)

    def _on_tokens(self, request: Request, result: StepResult, row: int, num_new: int) -> None:
        """The request's ``num_new`` newest tokens, in order (several after a verification step); a stop string
        inside them ends the request there, dropping the tokens after it."""
        group = self._groups[self._seq_to_group[request.request_id]]
        first = request.num_output_tokens - num_new
        if request.grammar is not None:
            num_new = self._advance_grammar(request, first)
        for j in range(num_new):
            token = request.output_token_ids[first + j]
            if group.on_token(request, result, row, j, token, final=j == num_new - 1):  # a stop string ended it
                request.truncate_output(first + j + 1)
                if num_new > 1:  # inside a verified run: its accepted drafts after the stop do not count
                    dropped = max(0, min(request.last_accepted, num_new) - (j + 1))
                    request.num_accepted_tokens -= dropped
                    self.num_accepted_tokens -= dropped
                if not request.is_finished:
                    sample = group.samples[request.request_id]
                    self.scheduler.finish_request(request.request_id, "stop", sample.stop_reason)
                return

    def _advance_grammar(self, request: Request, first: int) -> int:
        """The grammar consumes the request's output tokens from ``first`` on; returns how many of them stay.

        Once nothing but EOS may follow, the request stops there (vLLM's rule), so a verified run that goes on
        past that point (an EOS bonus token) is cut, as plain decoding would have ended. A rejected token
        (possible only when every allowed token was banned, e.g. min_tokens banning the EOS the grammar
        requires) also stops it, reporting the grammar's error as stop_reason."""
        tokens = request.output_token_ids[first:]
        finished = request.is_finished  # e.g. by the EOS that ends a verified run
        for j, token in enumerate(tokens):
            if finished and j == len(tokens) - 1:
                break  # its last token is what finished it: nothing to check
            if not request.grammar.accept([token]):
                self.scheduler.finish_request(request.request_id, "stop", f"grammar: {request.grammar.error}")
                return len(tokens)
            if request.grammar.is_terminated:
                request.truncate_output(first + j + 1)
                self.scheduler.finish_request(request.request_id, "stop")
                return j + 1
        return len(tokens)

    def _delta(self, group: RequestGroup, seq_ids: list[str]) -> RequestOutput:
        return group.delta({s: self._sequences[s] for s in group.samples}, seq_ids)

    def _collect_finished(self) -> None:
        """Forgets the groups that finished and were reported. Only the groups ``_emit`` touched can have
        (every way a sample ends passes through them), or those finished earlier and not yet reported; both
        are in ``_unreported``. Checking every live group cost ~2.5% of a 256-row step's host time."""
        candidates, self._unreported = self._unreported, set()
        for group_id in candidates:
            group = self._groups.get(group_id)
            if group is None or not group.finished:
                continue
            if not all(s.reported_finish for s in group.samples.values()):
                self._unreported.add(group_id)
                continue
            for seq_id in group.samples:
                del self._sequences[seq_id], self._seq_to_group[seq_id], self._seeds[seq_id]
            del self._groups[group_id]
            with self._ids_lock:
                self._live_ids.discard(group_id)

    # ------------------------------------------------------------------ introspection

    def reset_prefix_cache(self) -> bool:
        """Forget cached prefixes, in both tiers (refused while requests hold pages); benchmarks use it between
        runs."""
        if not self.kv_cache.reset_prefix_cache():
            return False
        if self.offloader is not None:
            self.offloader.drop_pending()
        return True

    def speculation_stats(self) -> dict[str, float | int | str]:
        """Drafted / accepted tokens, acceptance rate and mean tokens per verification (accepted + 1)."""
        if self.speculative is None:
            return {}
        return speculation_counters(
            self.speculative.method, self.num_draft_tokens, self.num_accepted_tokens, self.num_drafting_rows
        )

    def stats(self) -> dict[str, float | int]:
        cache = self.kv_cache
        return {
            "pages_total": cache.pages_total,
            "pages_free": cache.num_free_pages,
            "pages_cached": cache.num_cached_pages,
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_rate": cache.prefix_cache_hit_rate,
            "prompt_tokens_computed": self.scheduler.prompt_tokens_computed,
            "prompt_tokens_recomputed": self.scheduler.prompt_tokens_recomputed,
            "prefix_cache_queries": cache.num_queried_tokens,
            "prefix_cache_hits": cache.num_hit_tokens,
            "num_steps": self.num_steps,
            "num_step_failures": self.num_step_failures,
            "num_programs": self.runner.num_programs,
            "num_programs_total": self.runner.num_program_tasks(),
            "weight_bytes": self.runner.weight_bytes,
            "kv_bytes_per_token": self.runner.kv_bytes_per_token,
            **self.speculation_stats(),
            **self.lora_stats(),
            **self.host_tier_stats(),
            "programs_lowered_while_serving": self._lowerings.count,
        }

    def host_tier_stats(self) -> dict[str, float | int]:
        """The host KV tier's counters (empty without ``kv_offloading_size``)."""
        host = self.kv_cache.host
        if host is None:
            return {}
        c = host.counters
        costs = self.offloader.costs if self.offloader is not None else None
        measured = {} if costs is None else {f"host_{k}_seconds": v for k, v in vars(costs).items()}
        return {
            "host_tier_active": int(self.kv_cache.host_active),
            **measured,
            "host_pages_total": host.num_pages,
            "host_pages_used": host.num_used_pages,
            "host_hit_tokens": c.hit_tokens,
            "host_pages_offloaded": c.pages_offloaded,
            "host_pages_restored": c.pages_restored,
            "host_pages_evicted": c.pages_evicted,
            "host_pages_corrupted": c.pages_corrupted,
            "host_bytes_to_host": c.bytes_to_host,
            "host_bytes_to_device": c.bytes_to_device,
            "host_copy_seconds": c.copy_seconds,
        }

    def lora_stats(self) -> dict[str, float | int]:
        """Multi-LoRA counters (empty without ``enable_lora``)."""
        adapters = self.scheduler.adapters
        if adapters is None:
            return {}
        c = adapters.counters
        return {
            "lora_slots": adapters.num_slots,
            "lora_resident": len(adapters.resident),
            "lora_on_host": adapters.num_on_host,
            "lora_loads": c.loads,
            "lora_evictions": c.evictions,
            "lora_disk_loads": c.disk_loads,
            "lora_slot_waits": c.waits,
            "lora_slot_wait_seconds": c.wait_seconds,
        }


def speculation_counters(method: str, drafts: int, accepted: int, rows: int) -> dict[str, float | int | str]:
    """``stats()``'s speculative-decoding entries; rows: verification rows that carried drafts."""
    return {
        "spec_method": method,
        "spec_num_draft_tokens": drafts,
        "spec_num_accepted_tokens": accepted,
        "spec_num_drafting_rows": rows,
        "spec_acceptance_rate": accepted / drafts if drafts else 0.0,
        "spec_mean_accepted_length": (accepted + rows) / rows if rows else 0.0,
    }


__all__ = ["Engine", "RequestStatus", "speculation_counters"]
