"""Adaptive speculation's policy (jserve/speculative/policy.py) and its engine side (controller.py)."""

from __future__ import annotations

import dataclasses

import pytest

from jserve.engine.request import Request, RequestStatus
from jserve.sampling_params import SamplingParams
from jserve.speculative.config import DRAFT, NGRAM, SpeculativeConfig
from jserve.speculative.controller import DRAFT_MODEL_GIVE_UP, SpeculationController
from jserve.speculative.policy import (
    FIRST_PROBE,
    MAX_PROBE,
    Acceptance,
    Candidate,
    StepCosts,
    choose_drafts,
    expected_tokens,
    no_dearer_than_larger,
)


def costs(plain_ms: float, verify_ms: float, per_token_ms: float = 0.0) -> StepCosts:
    """Step costs over buckets 1..64: a fixed part plus a part per token (compute-bound steps)."""
    buckets = [1, 2, 4, 8, 16, 32, 64]
    return StepCosts(
        plain={b: (plain_ms + per_token_ms * b) / 1e3 for b in buckets},
        verify={b: (verify_ms + per_token_ms * b) / 1e3 for b in buckets},
    )


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_acceptance_follows_evidence_and_fades_back():
    a = Acceptance()
    assert a.rate == pytest.approx(0.5)  # the prior
    for _ in range(10):
        a.record(4, 4)
    high = a.rate
    assert high > 0.9
    for _ in range(10):
        a.record(4, 0)
    assert a.rate < 0.2
    low = a.rate
    for _ in range(100):
        a.skipped()
    assert low < a.rate < 0.5 + 1e-6 and abs(a.rate - 0.5) < 0.05


def test_plain_when_verification_costs_more_than_drafts_bring():
    expensive = costs(plain_ms=1.0, verify_ms=3.0)
    assert choose_drafts([Candidate("a", 0.3, 4)], 0, expensive, 4) == {}
    assert choose_drafts([Candidate("a", 0.95, 4)], 0, expensive, 4) == {"a": 4}
    # verification as cheap as a plain step: any acceptance pays, with every draft
    assert choose_drafts([Candidate("a", 0.1, 4)], 0, costs(1.0, 1.0), 4) == {"a": 4}


def test_picks_the_rows_and_length_that_pay():
    mixed = costs(plain_ms=1.0, verify_ms=1.6, per_token_ms=0.05)
    chosen = choose_drafts([Candidate("good", 0.9, 4), Candidate("bad", 0.05, 4)], 1, mixed, 4)
    assert chosen.get("good", 0) >= 1 and "bad" not in chosen
    # a request near its max_tokens takes what it can
    assert choose_drafts([Candidate("a", 0.99, 2)], 0, costs(1.0, 1.0), 4) == {"a": 2}


def test_compute_bound_batches_decode_plainly():
    # every token costs the same: verifying k drafts costs k tokens' compute; at acceptance 0.6 it cannot pay
    bound = costs(plain_ms=0.0, verify_ms=0.0, per_token_ms=1.0)
    candidates = [Candidate(str(i), 0.6, 4) for i in range(8)]
    assert choose_drafts(candidates, 0, bound, 4) == {}


def test_observed_overheads_shift_the_choice():
    c = costs(plain_ms=1.0, verify_ms=1.2)
    assert choose_drafts([Candidate("a", 0.5, 4)], 0, c, 4)  # 1.94 tokens for 1.2x the time: pays
    for _ in range(4):
        c.observe(speculated=True, num_tokens=5, wall_seconds=4e-3)  # speculating steps lose the lookahead
        c.observe(speculated=False, num_tokens=1, wall_seconds=1e-3)
    assert c.spec_overhead == pytest.approx(4 / 1.2) and c.plain_overhead == 1.0
    c.observe(speculated=False, num_tokens=1, wall_seconds=2.0)  # the caller paused between two steps
    assert c.plain_overhead == 1.0
    assert choose_drafts([Candidate("a", 0.5, 4)], 0, c, 4) == {}


def test_one_slow_step_does_not_set_the_overhead():
    """The overhead is the median of the kind's recent ratios and a prior of three at 1: a plain step four times
    its program's time (the first after a run of verifications) among ordinary ones leaves plain decoding's
    estimate where the ordinary ones put it."""
    c = costs(plain_ms=1.0, verify_ms=1.2)
    c.observe(speculated=False, num_tokens=1, wall_seconds=4e-3)
    assert c.plain_overhead == 1.0  # the prior outweighs one step
    for _ in range(6):
        c.observe(speculated=False, num_tokens=1, wall_seconds=1.1e-3)
    assert c.plain_overhead == pytest.approx(1.1)
    for _ in range(40):  # the load changed: the window follows it
        c.observe(speculated=False, num_tokens=1, wall_seconds=2e-3)
    assert c.plain_overhead == pytest.approx(2.0)


def test_a_plain_step_timed_high_at_startup_is_corrected_by_real_steps():
    """The startup timing of the 1-token program met another thread's work (4 ms where its steps take 2): real
    steps scale the estimate down, and drafts that only looked cheap next to the inflated plain step stop."""
    c = costs(plain_ms=4.0, verify_ms=4.5)
    rate = 0.55  # 2.1 tokens a verification at k=4: 4.5 ms for them beats 4 ms a token, not 2 ms
    assert choose_drafts([Candidate("a", rate, 4)], 0, c, 4) == {"a": 4}
    for _ in range(8):
        c.observe(speculated=False, num_tokens=1, wall_seconds=2e-3)
        c.observe(speculated=True, num_tokens=5, wall_seconds=4.5e-3)
    assert c.plain_overhead == pytest.approx(0.5) and c.spec_overhead == pytest.approx(1.0)
    assert choose_drafts([Candidate("a", rate, 4)], 0, c, 4) == {}
    for _ in range(20):  # steps that finished together with the one before: not what a step costs
        c.observe(speculated=False, num_tokens=1, wall_seconds=1e-5)
    assert c.plain_overhead == pytest.approx(0.5)


def test_startup_timings_are_capped_by_larger_buckets():
    assert no_dearer_than_larger({1: 4.2e-3, 2: 1.7e-3, 4: 2.0e-3, 8: 3.3e-3, 16: 2.5e-3}) == {
        1: 1.7e-3,
        2: 1.7e-3,
        4: 2.0e-3,
        8: 2.5e-3,
        16: 2.5e-3,
    }


def _request(i: int, **params) -> Request:
    r = Request(f"r{i}", list(range(1, 40)), SamplingParams(max_tokens=100, **params))
    r.status = RequestStatus.RUNNING
    r.num_computed_tokens = r.num_tokens - 1
    r.append_output_token(5)
    r.num_computed_tokens = r.num_tokens - 1
    return r


def test_controller_stops_a_failing_request_and_probes_it_with_backoff():
    config = SpeculativeConfig(method=NGRAM, num_tokens=4)

    def probes(verify_ms: float, steps: int) -> list[int]:
        controller = SpeculationController(config, costs(plain_ms=1.0, verify_ms=verify_ms), max_model_len=512)
        request = _request(0, temperature=0.0)
        request.acceptance = Acceptance(accepted=0.0, trials=20.0)  # its drafts kept failing
        drafted_at = []
        for step in range(steps):
            if controller.plan([request], lambda r: True):
                drafted_at.append(step)
                controller.record(request, 0)  # the probe failed
        return drafted_at

    # cheap verification: probed after FIRST_PROBE steps, then tried now and then as the evidence fades
    cheap = probes(1.3, 50)
    assert cheap[0] == FIRST_PROBE and len(cheap) <= 3
    # a probe that costs 2 plain steps more than the plain step it replaces comes every 2 / 3% = 67 steps
    expensive = probes(3.0, 300)
    gaps = [b - a for a, b in zip([-1, *expensive], expensive, strict=False)]
    assert len(expensive) >= 3 and all(gap >= 2 / 0.03 for gap in gaps), expensive


def test_seeded_sampling_drafts_whatever_the_costs():
    config = SpeculativeConfig(method=NGRAM, num_tokens=4)
    controller = SpeculationController(config, costs(plain_ms=1.0, verify_ms=50.0), max_model_len=512)
    seeded, greedy = _request(0, temperature=0.7, seed=3), _request(1, temperature=0.0)
    assert controller.plan([seeded, greedy], lambda r: True)
    assert seeded.wants_drafts and not greedy.wants_drafts


def test_where_even_accepted_drafts_lose_nobody_drafts_and_probes_are_rare():
    """A verification of k = 4 drafts that costs 6 plain steps loses even if all 4 are accepted: no request
    drafts by its estimate, and probes (which re-measure what a verification costs) come only every MAX_PROBE
    steps, where the 3% rule alone would allow one every 167; a seeded request still drafts at once."""
    config = SpeculativeConfig(method=NGRAM, num_tokens=4)
    slow = costs(plain_ms=1.0, verify_ms=6.0)
    controller = SpeculationController(config, slow, max_model_len=512)
    assert not controller.drafting_can_pay(1) and not controller.drafting_can_pay(4)
    assert SpeculationController(config, costs(plain_ms=1.0, verify_ms=4.0), 512).drafting_can_pay(1)
    request = _request(0, temperature=0.0)
    probes = []
    for step in range(600):
        if controller.plan([request], lambda r: True):
            probes.append(step)
            controller.record(request, 0)
    assert probes == [MAX_PROBE, 2 * MAX_PROBE + 1], probes
    seeded = _request(1, temperature=0.7, seed=1)
    assert controller.plan([seeded], lambda r: True) and seeded.wants_drafts


def test_draft_model_stops_once_no_request_may_draft_soon():
    config = SpeculativeConfig(method=DRAFT, num_tokens=3, draft_model="/draft")
    controller = SpeculationController(config, costs(plain_ms=1.0, verify_ms=3.0), max_model_len=512)
    fresh, stale = _request(0, temperature=0.0), _request(1, temperature=0.0)
    stale.steps_without_drafts = DRAFT_MODEL_GIVE_UP
    assert controller.keeps_draft_model([fresh, stale])
    assert not controller.keeps_draft_model([stale])
    fixed = SpeculationController(dataclasses.replace(config, adaptive=False), controller.costs, max_model_len=512)
    assert fixed.keeps_draft_model([stale])  # without the policy every request keeps drafting


def test_processes_in_lockstep_do_not_adapt(monkeypatch):
    """Multi-host engines must all schedule the same steps; the policy decides by each process's timings, so it
    is off there (every request drafts whenever it can)."""
    import jax

    from jserve import BUNDLED_MODEL
    from jserve.config import ModelConfig
    from jserve.engine import factory
    from jserve.engine_args import EngineArgs

    args = EngineArgs(model=str(BUNDLED_MODEL), speculative_model="ngram", num_speculative_tokens=2)
    cfg = ModelConfig.from_pretrained(BUNDLED_MODEL)
    assert factory._speculative_config(args, cfg).adaptive
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not factory._speculative_config(args, cfg).adaptive


def test_a_step_with_more_rows_costs_the_bucket_that_samples_them():
    """Verification programs sample about one row per k + 1 tokens (``verification_rows``): a step whose rows
    outnumber what its token count's bucket samples is costed at the larger bucket it will run in."""
    c = StepCosts(plain={1: 1e-3}, verify={8: 2e-3, 16: 3e-3, 32: 5e-3}, verify_rows={8: 1, 16: 2, 32: 4})
    assert c.spec_step(8) == pytest.approx(2e-3)
    assert c.spec_step(8, num_rows=2) == pytest.approx(3e-3)
    assert c.spec_step(5, num_rows=3) == pytest.approx(5e-3)
    # no verification program holds five rows: such a step cannot verify, so the policy must not draft for it
    assert c.spec_step(8, num_rows=5) == float("inf")
    assert choose_drafts([Candidate(f"r{i}", 0.99, 3) for i in range(5)], 0, c, 3) == {}
