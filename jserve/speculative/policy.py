"""Adaptive speculation: how many drafts each request verifies this step, 0 when drafting would not pay.

Each request keeps an estimate of the chance that a draft is accepted (``Acceptance``: accepted drafts over
draft trials, with a prior and a decay so it follows the text). A row that verifies k drafts accepted with
probability a each yields ``1 + a + ... + a^k`` tokens on average. The step's cost comes from
``StepCosts``: the compiled programs timed at startup (a plain step per token bucket, a verification step per
token bucket, the device drafter), scaled by the wall time steps of each kind actually took. The scale goes
both ways: up for the host's share of a step, down where the startup timing caught the machine busy (on a
shared CPU one program's startup time can read twice what its steps later take, and a plain step priced too
high makes every draft look cheap). The policy picks the drafts that maximise the
step's expected tokens per second and speculates only when that beats the plain step's rows per second.

A request whose drafts keep failing stops drafting; while it does not draft its estimate decays back towards
the prior, so it is tried again after a while (``RETRY_DECAY``).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from dataclasses import dataclass, field

PRIOR_ACCEPTED = 0.5  # the prior: half a draft accepted of one tried (a = 0.5 before any evidence)
PRIOR_TRIALS = 1.0
DECAY = 0.75  # per draft tried: evidence from a few verifications back hardly counts (text changes)
RETRY_DECAY = 0.93  # per step without drafts: after ~20 such steps the evidence weighs a quarter of what it did
OVERHEAD_WINDOW = 32  # steps of each kind whose median wall-time ratio scales the kind's startup timing
OVERHEAD_PRIOR_STEPS = 3  # ratios of 1 each window starts with
MAX_OVERHEAD = 20.0  # a step's wall time above this many times its program's is a pause, not a step
MIN_OVERHEAD = 0.1  # nor one below a tenth of it (a step that finished together with the one before)
FIRST_PROBE = 16  # steps without drafts before a request is probed (jserve.speculative.controller)
MAX_PROBE = 256


@dataclass
class Acceptance:
    """A request's draft acceptance estimate (kept on the Request)."""

    accepted: float = 0.0
    trials: float = 0.0

    @property
    def rate(self) -> float:
        return (self.accepted + PRIOR_ACCEPTED) / (self.trials + PRIOR_TRIALS)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """A verification: ``num_accepted`` of ``num_drafts`` accepted. Each accepted draft is a success; the
        first rejected one (if any) a failure; drafts after it were never tried."""
        tried = num_accepted + (1 if num_accepted < num_drafts else 0)
        fade = DECAY**tried
        self.accepted = self.accepted * fade + num_accepted
        self.trials = self.trials * fade + tried

    def skipped(self) -> None:
        """A step without drafts: the evidence fades, so the request is tried again later."""
        self.accepted *= RETRY_DECAY
        self.trials *= RETRY_DECAY


def expected_tokens(rate: float, num_drafts: int) -> float:
    """Tokens a verification row yields on average: the accepted run of drafts plus the target's own token."""
    return sum(rate**i for i in range(num_drafts + 1))


def _bucket_cost(costs: dict[int, float], num_tokens: int) -> float:
    buckets = sorted(costs)
    i = bisect.bisect_left(buckets, num_tokens)
    return costs[buckets[min(i, len(buckets) - 1)]] if buckets else 0.0


def no_dearer_than_larger(costs: dict[int, float]) -> dict[int, float]:
    """Bucket -> seconds with each bucket's time capped by every larger bucket's: a program over fewer tokens
    does no more work, so a smaller bucket that timed dearer met interference (the larger one's time bounds
    it)."""
    capped, cheapest = {}, math.inf
    for bucket in sorted(costs, reverse=True):
        cheapest = min(cheapest, costs[bucket])
        capped[bucket] = cheapest
    return dict(sorted(capped.items()))


@dataclass
class StepCosts:
    """Seconds per run of each compiled program (measured at startup on all-padding steps), and the measured
    ratio of a step's wall time to its program time for plain and for speculating steps (the "overhead": above 1
    for the host's share on the critical path, below 1 where the startup timing read high)."""

    plain: dict[int, float]  # token bucket -> seconds
    verify: dict[int, float]  # verification token bucket -> seconds (the device drafter's k steps included)
    verify_rows: dict[int, int] = field(default_factory=dict)  # verification token bucket -> rows it samples
    # the last OVERHEAD_WINDOW observed ratios of wall time to program time, per kind (speculated or not)
    # (each window starts with OVERHEAD_PRIOR_STEPS ratios of 1: a prior, as for acceptance)
    _ratios: dict[bool, deque] = field(
        default_factory=lambda: {k: deque([1.0] * OVERHEAD_PRIOR_STEPS, maxlen=OVERHEAD_WINDOW) for k in (False, True)}
    )

    _overheads: dict[bool, float] = field(default_factory=lambda: {False: 1.0, True: 1.0})  # their medians

    @property
    def plain_overhead(self) -> float:
        return self._overheads[False]

    @property
    def spec_overhead(self) -> float:
        return self._overheads[True]

    @property
    def measured(self) -> bool:
        return bool(self.plain and self.verify)

    def program(self, speculated: bool, num_tokens: int, num_rows: int = 1) -> float:
        """The startup time of the program a step of this kind, size and (verification) rows runs."""
        if not speculated:
            return _bucket_cost(self.plain, num_tokens)
        for bucket in sorted(self.verify):
            if bucket >= num_tokens and self.verify_rows.get(bucket, num_rows) >= num_rows:
                return self.verify[bucket]
        return math.inf if self.verify else 0.0  # no verification program holds it: the step decodes plainly

    def plain_step(self, num_tokens: int) -> float:
        return self.program(False, num_tokens) * self.plain_overhead

    def spec_step(self, num_tokens: int, num_rows: int = 1) -> float:
        return self.program(True, num_tokens, num_rows) * self.spec_overhead

    def observe(self, speculated: bool, num_tokens: int, wall_seconds: float) -> None:
        """A finished step's wall time (see ``SpeculationController.observe_finished``): one more ratio of that
        kind. ``num_tokens``: the step's token bucket."""
        base = self.program(speculated, num_tokens)
        if not 0 < base < math.inf or not MIN_OVERHEAD * base <= wall_seconds <= MAX_OVERHEAD * base:
            return  # (a pause of the caller, or a step that finished with the one before: not a step's cost)
        ratios = self._ratios[speculated]
        ratios.append(wall_seconds / base)
        # the median of the kind's recent ratios and the prior's: one slow step (the first plain step after a
        # run of verifications, a first run, a pause of the caller's) moves it little, a change of load within
        # a window
        self._overheads[speculated] = statistics.median(ratios)


@dataclass(frozen=True)
class Candidate:
    """A running request that may draft: its acceptance rate and how many drafts it can take this step."""

    request_id: str
    rate: float
    max_drafts: int


def choose_drafts(candidates: list[Candidate], num_plain_rows: int, costs: StepCosts, max_k: int) -> dict[str, int]:
    """Drafts per candidate (absent: none) for the step, or {} when plain decoding is expected to be faster.

    ``num_plain_rows``: rows of the step that decode one token whatever happens (requests not drafting,
    prefill chunks count their tokens). Tries every common draft length k = 1..max_k, each time adding
    candidates best rate first while they raise the expected tokens per second, and keeps the best.
    """
    rows = num_plain_rows + len(candidates)
    if not candidates or rows <= 0:
        return {}
    plain_rate = rows / costs.plain_step(rows)
    best: tuple[float, dict[str, int]] = (plain_rate, {})
    ordered = sorted(candidates, key=lambda c: -c.rate)
    for k in range(1, max_k + 1):
        chosen: dict[str, int] = {}
        tokens_out = float(rows)
        tokens_in = rows
        current = 0.0
        for c in ordered:
            n = min(k, c.max_drafts)
            if n <= 0:
                continue
            gain = tokens_out - 1 + expected_tokens(c.rate, n)
            rate = gain / costs.spec_step(tokens_in + n, rows)
            if rate <= current:
                break  # later candidates have lower rates: they would not pay either
            chosen[c.request_id] = n
            tokens_out, tokens_in, current = gain, tokens_in + n, rate
        if chosen and current > best[0]:
            best = (current, chosen)
    return best[1]
