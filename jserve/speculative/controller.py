"""The engine's side of adaptive speculation: which running requests draft this step, and the evidence.

Each step, before scheduling, ``plan`` asks the policy (``jserve.speculative.policy``) which of the requests
that may draft should, and how many drafts each: by their acceptance estimates and the measured step costs.
When none should, the step is a plain one and keeps async scheduling's lookahead. A request chosen to draft
whose step is still on the device either drafts in a row chained to it (the device makes the drafts:
``jserve.speculative.chain``) or, with penalties or a grammar, sits this step out (``Request.wants_drafts``)
and drafts at the next.

A request that has not drafted for a while is probed (drafts once whatever its estimate says), with the interval
doubling after each probe that did not pay (16 steps, then 32, ... up to 256) and never shorter than what keeps
probes under 3% of the request's time (a probe costs a speculating step where a plain one would have run), nor
than 256 steps where even accepted drafts would lose at the measured costs: its estimate fades between probes,
so text that turns repetitive is noticed at a bounded cost.
"""

from __future__ import annotations

import time

from jserve.engine.request import Request
from jserve.speculative.config import DRAFT, SpeculativeConfig
from jserve.speculative.ngram import propose_ngram
from jserve.speculative.policy import FIRST_PROBE, MAX_PROBE, Candidate, StepCosts, choose_drafts

DRAFT_MODEL_GIVE_UP = 2 * FIRST_PROBE  # steps without drafts after which a request stops keeping the draft model
PROBE_COST_SHARE = 0.03  # probes may cost at most this share of a request's time


def _reproducible_draws(request: Request) -> bool:
    """A seeded sampling request: its draws depend on which tokens were drafted (an accepted draft is the
    drafter's draw, a plain step's token the target's), so it drafts whenever it can, whatever the timings,
    and the same seed gives the same text (as before adaptive speculation) at a given batch policy."""
    params = request.sampling_params
    return params.seed is not None and params.temperature > 0


class SpeculationController:
    def __init__(self, config: SpeculativeConfig, costs: StepCosts, max_model_len: int):
        self.config = config
        self.costs = costs
        self.max_model_len = max_model_len
        self._last_finish: float | None = None  # when the last step's results reached the host (None: idle since)

    def keeps_draft_model(self, requests: list[Request]) -> bool:
        """Draft-model speculation: the draft model's K/V follow every token the target computes (a cost in
        every step) only while some running or waiting request may draft soon; a request that has not drafted for
        ``DRAFT_MODEL_GIVE_UP`` steps (its probes kept failing) no longer keeps it, and once none does the draft
        model stops and those requests decode plainly to the end (their draft K/V are then stale)."""
        if self.config.method != DRAFT or not (self.config.adaptive and self.costs.measured):
            return True
        return any(
            r.draft_synced and r.sampling_params.speculative and r.steps_without_drafts < DRAFT_MODEL_GIVE_UP
            for r in requests
        )

    def drafting_can_pay(self, num_rows: int) -> bool:
        """Whether a step of ``num_rows`` requests (some of them drafting, every draft accepted) would beat
        plain decoding at the measured costs. When not (a drafter dearer than k + 1 plain steps), requests
        are probed only every ``MAX_PROBE`` steps (each probe also re-measures what a verification costs, so a
        change of load that makes drafting pay is noticed)."""
        k = self.config.num_tokens
        best_case = [Candidate(str(i), 1.0, k) for i in range(max(1, num_rows))]
        return bool(choose_drafts(best_case, 0, self.costs, k))

    def draft_limit(self, request: Request) -> int:
        """Drafts the request can take: k, less near max_tokens or the model's length."""
        return min(
            self.config.num_tokens,
            request.sampling_params.max_tokens - request.num_sampled - 1,
            self.max_model_len - request.num_tokens - 1,
        )

    def plan(self, running: list[Request], may_draft, allowed: bool = True, may_chain=None) -> bool:
        """Sets each running request's ``draft_token_ids`` and ``wants_drafts`` for this step; returns whether
        any request drafts (the step speculates). ``may_draft(request)``: the engine's eligibility check, all
        but the pending-token one; ``allowed``: the step may speculate at all (the batch bound);
        ``may_chain(request)``: a request whose step is on the device may draft in a row chained to it
        (``chain_drafts``; jserve.speculative.chain) instead of sitting this step out."""
        for request in running:
            request.draft_token_ids = []
            request.wants_drafts = False
            request.chain_drafts = 0
        if not allowed or len(running) > self.config.max_batch_size:
            return False
        limits = {r.request_id: self.draft_limit(r) for r in running if may_draft(r)}
        eligible = [r for r in running if limits.get(r.request_id, 0) > 0]
        candidates = [Candidate(r.request_id, r.acceptance.rate, limits[r.request_id]) for r in eligible]
        chosen = {c.request_id: c.max_drafts for c in candidates}  # costs unmeasured: everyone drafts all
        adaptive = [c for c, r in zip(candidates, eligible, strict=True) if not _reproducible_draws(r)]
        if self.config.adaptive and self.costs.measured and adaptive:
            for c in adaptive:
                del chosen[c.request_id]
            others = len(running) - len(adaptive)
            chosen.update(choose_drafts(adaptive, others, self.costs, self.config.num_tokens))
        probe_after = self._probe_spacing(len(running))
        for request in eligible:
            n = chosen.get(request.request_id, 0)
            if not n and request.steps_without_drafts >= max(request.probe_interval, probe_after):
                n = limits[request.request_id]  # a probe
            if not n:
                request.acceptance.skipped()
                request.steps_without_drafts += 1
                continue
            request.wants_drafts = True
            if request.num_pending_tokens or request.awaiting_verification:
                # drafts continue its last token: chained to its step on the device, or it drafts at the next
                if may_chain is not None and may_chain(request):
                    request.chain_drafts = min(n, self.chain_limit(request))
                continue
            self._draft(request, n)
        return any(r.wants_drafts for r in running)

    def chain_limit(self, request: Request) -> int:
        """Draft slots a chained row can hold: k, less near the model's length as if the step on the device
        accepted all it verifies (the device caps the drafts at what max_tokens leaves after that step's
        actual tokens, as a synchronous step would)."""
        in_flight = request.in_flight_drafts + 1 if request.awaiting_verification else 0
        return max(0, min(self.config.num_tokens, self.max_model_len - request.num_tokens - in_flight - 1))

    def _probe_spacing(self, num_rows: int = 1) -> float:
        """Steps between probes that keep their cost under PROBE_COST_SHARE of a lone request's time: a probe
        costs a speculating step (k + 1 tokens) where a plain one-token step would have run; and at least
        MAX_PROBE where even accepted drafts would lose in a step of ``num_rows`` (``drafting_can_pay``)."""
        if not self.costs.measured:
            return 0.0
        k = self.config.num_tokens
        extra = self.costs.spec_step(k + 1) / self.costs.plain_step(1) - 1.0
        spacing = max(0.0, extra) / PROBE_COST_SHARE
        return spacing if self.drafting_can_pay(num_rows) else max(spacing, MAX_PROBE)

    def _draft(self, request: Request, num_drafts: int) -> None:
        request.drafts_offered = num_drafts
        if self.config.samples_drafts:
            request.draft_token_ids = [0] * num_drafts  # placeholders the device drafter fills in
            return
        drafts = propose_ngram(
            request.all_token_ids,
            k=num_drafts,
            min_n=self.config.prompt_lookup_min,
            max_n=self.config.prompt_lookup_max,
        ).tolist()
        if request.grammar is not None:  # drafts the grammar rejects could never be accepted
            drafts = drafts[: request.grammar.valid_prefix(drafts)]
        request.draft_token_ids = drafts
        if not drafts:  # nothing to look up: as good as a rejected draft
            self.record(request, 0)

    def record(self, request: Request, num_accepted: int) -> None:
        """A verification of the request's drafts (or a lookup that found none): updates its estimate and its
        probing schedule."""
        offered = max(request.drafts_offered, num_accepted)
        request.acceptance.record(offered, num_accepted)
        request.drafts_offered = 0
        paid = num_accepted > 0
        request.probe_interval = FIRST_PROBE if paid else min(request.probe_interval * 2, MAX_PROBE)
        request.steps_without_drafts = 0

    def observe_finished(self, speculated: bool, bucket: int) -> None:
        """Called as each step's results reach the host: the time since the previous step's did is what this
        step cost, the host work on the critical path included. That holds with async scheduling as without:
        in a busy engine one step completes per such interval. An interval in which the engine also waited for
        something else (a request sitting a step out after a synchronous verification) is charged to the step
        that ends it, which may not be the one that caused it: each kind's overhead is a median, which a few
        such intervals do not move.
        The first step after the engine idled is not counted (the interval was no step's)."""
        now = time.perf_counter()
        if self._last_finish is not None:
            self.costs.observe(speculated, bucket, now - self._last_finish)
        self._last_finish = now

    def idle(self) -> None:
        """The engine had nothing to run: the next interval is not a step's."""
        self._last_finish = None
