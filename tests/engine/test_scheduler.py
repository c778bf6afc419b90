"""Scheduler: budgets, chunked prefill, decode, preemption, abort, priorities, prefix deferral, stops.

Ends with a hypothesis property test that drives a simulated engine loop (random arrivals, lengths, aborts,
small pools, fake sampled tokens) and checks the bookkeeping every step.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jserve.engine.kv_cache import KVCacheManager
from jserve.engine.request import PENDING_TOKEN, Request, RequestStatus
from jserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from jserve.sampling_params import SamplingParams

EOS = 0
TOKEN = 7  # a sampled token that is never a stop


def make_scheduler(
    *, num_pages: int = 64, page_size: int = 4, caching: bool = True, **config
) -> tuple[Scheduler, KVCacheManager]:
    config.setdefault("max_model_len", 64)
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(**config), kv), kv


_fresh_tokens = itertools.count(1000)


def make_request(request_id: str, prompt: list[int] | int, *, arrival: float = 0.0, **params) -> Request:
    """A request; an int prompt means that many tokens shared with no other request."""
    tokens = [next(_fresh_tokens) for _ in range(prompt)] if isinstance(prompt, int) else prompt
    return Request(request_id, tokens, SamplingParams(**params), eos_token_ids=[EOS], arrival_time=arrival)


def step(sched: Scheduler, token: int | dict[str, int] = TOKEN) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    sampled = {
        c.request_id: (token if isinstance(token, int) else token.get(c.request_id, TOKEN))
        for c in out.chunks
        if c.sample
    }
    return out, sched.update(out, sampled)


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished:
        outs.append(step(sched)[0])
        assert len(outs) < max_steps, "no progress"
    return outs


# ---- request ---------------------------------------------------------------------------------------------
def test_request_counters_and_status():
    request = make_request("a", [1, 2, 3], max_tokens=4, priority=2)
    assert (request.num_prompt_tokens, request.num_output_tokens, request.num_tokens) == (3, 0, 3)
    assert request.priority == 2 and request.eos_token_ids == [EOS] and not request.is_finished
    request.append_output_token(9)
    request.output_token_ids.append(8)  # appended behind its back: all_token_ids still follows
    assert request.all_token_ids == [1, 2, 3, 9, 8] and request.num_tokens == 5
    request.set_finished(RequestStatus.FINISHED_LENGTH)
    assert request.is_finished and request.finish_reason == "length" and request.finished_time is not None
    assert request.num_output_tokens == 2


def test_pending_tokens():
    """Async scheduling: a pending token holds a position until the device's token replaces it."""
    request = make_request("a", [1, 2, 3], max_tokens=4)
    request.append_output_token(9)
    request.add_pending_token()
    assert request.all_token_ids == [1, 2, 3, 9, PENDING_TOKEN] and request.num_tokens == 5
    assert (request.num_output_tokens, request.num_sampled) == (1, 2) and request.output_token_ids == [9]
    with pytest.raises(ValueError):
        request.append_output_token(5)
    request.resolve_pending_token(7)
    assert request.all_token_ids == [1, 2, 3, 9, 7] and request.output_token_ids == [9, 7]
    request.add_pending_token()
    request.num_computed_tokens = 6
    request.drop_pending_tokens()
    assert request.all_token_ids == [1, 2, 3, 9, 7] and request.num_computed_tokens == 5
    assert RequestStatus.from_finish_reason("abort") is RequestStatus.FINISHED_ABORTED
    assert not RequestStatus.PREEMPTED.is_finished and RequestStatus.PREEMPTED.finish_reason is None
    assert make_request("b", [1], ignore_eos=True).eos_token_ids == []
    with pytest.raises(ValueError, match="prompt_token_ids"):
        make_request("c", [])
    with pytest.raises(ValueError, match="finished state"):
        request.set_finished(RequestStatus.RUNNING)


# ---- config --------------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(max_model_len=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_model_len=8, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_model_len=8, max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= max_model_len"):
        SchedulerConfig(max_model_len=100, max_num_batched_tokens=64, max_num_seqs=4, enable_chunked_prefill=False)
    SchedulerConfig(max_model_len=100, max_num_batched_tokens=100, enable_chunked_prefill=False)


def test_add_request_rejects_prompt_longer_than_max_model_len():
    sched, _ = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_request("a", 9))
    sched.add_request(make_request("b", 8))
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_request("b", 3))


# ---- budgets, chunks -----------------------------------------------------------------------------
def test_token_budget_and_max_num_seqs_every_step():
    sched, kv = make_scheduler(max_num_seqs=3, max_num_batched_tokens=8)
    for i in range(10):
        sched.add_request(make_request(f"r{i}", 7, arrival=i, max_tokens=3))
    outs = run_to_completion(sched)
    for out in outs:
        assert out.num_batched_tokens == sum(len(c.token_ids) for c in out.chunks) <= 8
        assert len(out.chunks) <= 3
    assert kv.num_free_pages == kv.pages_total
    assert sched.prompt_tokens_computed == 70


def test_chunked_prefill_tiles_the_prompt_then_decodes():
    sched, _ = make_scheduler(max_num_batched_tokens=5, max_num_seqs=1, caching=False)
    request = make_request("a", 23, max_tokens=3)
    sched.add_request(request)
    chunks = []
    while sched.has_unfinished:
        out, _ = step(sched, token=40 + len(chunks))
        (chunk,) = out.chunks
        chunks.append(chunk)
        assert len(chunk.block_table) * 4 >= chunk.start_pos + len(chunk.token_ids)
    prefill, decode = chunks[:5], chunks[5:]
    assert [len(c.token_ids) for c in prefill] == [5, 5, 5, 5, 3]
    assert [c.start_pos for c in prefill] == [0, 5, 10, 15, 20]
    assert sum((c.token_ids for c in prefill), []) == request.prompt_token_ids
    assert [c.sample for c in prefill] == [False] * 4 + [True]
    # The token sampled after the prompt was 44; decodes carry the last sampled token, one at a time.
    assert [(c.token_ids, c.start_pos, c.sample) for c in decode] == [([44], 23, True), ([45], 24, True)]
    assert request.output_token_ids == [44, 45, 46] and request.finish_reason == "length"


def test_chunked_prefill_shares_budget_with_decodes():
    sched, _ = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    sched.add_request(make_request("short", 2, max_tokens=5))
    step(sched)  # short prefilled, now decoding
    sched.add_request(make_request("long", 20, arrival=1, max_tokens=1))
    out, _ = step(sched)
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("short", 1), ("long", 7)]
    out, _ = step(sched)
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("short", 1), ("long", 7)]


def test_no_chunked_prefill_waits_for_whole_prompt():
    sched, _ = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=16, enable_chunked_prefill=False)
    sched.add_request(make_request("a", 10, max_tokens=4))
    sched.add_request(make_request("b", 10, arrival=1, max_tokens=4))
    out, _ = step(sched)
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("a", 10)]  # b does not fit in 6
    out, _ = step(sched)
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("a", 1), ("b", 10)]


def test_prompt_logprobs_flag_only_on_prompt_chunks():
    sched, _ = make_scheduler(max_num_batched_tokens=4, max_num_seqs=1)
    sched.add_request(make_request("a", 6, max_tokens=2, prompt_logprobs=1))
    flags = [c.prompt_logprobs for out in run_to_completion(sched) for c in out.chunks]
    assert flags == [True, True, False]


# ---- stops ---------------------------------------------------------------------------------------
def test_eos_respects_min_tokens_and_ignore_eos():
    sched, _ = make_scheduler()
    sched.add_request(make_request("eos", 3, max_tokens=10))
    sched.add_request(make_request("min", 3, max_tokens=10, min_tokens=2))
    sched.add_request(make_request("ign", 3, max_tokens=3, ignore_eos=True))
    finished = {}
    while sched.has_unfinished:
        _, updated = step(sched, token=EOS)
        finished.update({r.request_id: r for r in updated if r.is_finished})
    assert (finished["eos"].output_token_ids, finished["eos"].finish_reason) == ([EOS], "stop")
    assert (finished["min"].output_token_ids, finished["min"].finish_reason) == ([EOS, EOS], "stop")
    assert (finished["ign"].output_token_ids, finished["ign"].finish_reason) == ([EOS] * 3, "length")
    assert finished["eos"].stop_reason is None


def test_stop_token_ids_set_stop_reason():
    sched, _ = make_scheduler()
    request = make_request("a", 3, max_tokens=10, stop_token_ids=[9])
    sched.add_request(request)
    step(sched, token=5)
    step(sched, token=9)
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert (request.finish_reason, request.stop_reason, request.output_token_ids) == ("stop", 9, [5, 9])
    assert request.first_token_time is not None and request.finished_time is not None


def test_max_model_len_stops_with_length():
    sched, kv = make_scheduler(max_model_len=6)
    request = make_request("a", 4, max_tokens=100)
    sched.add_request(request)
    run_to_completion(sched)
    assert request.num_tokens == 6 and request.finish_reason == "length"
    full = make_request("b", 6, max_tokens=100)  # a prompt of max_model_len still gets one token
    sched.add_request(full)
    run_to_completion(sched)
    assert full.num_output_tokens == 1 and full.finish_reason == "length"
    assert kv.num_free_pages == kv.pages_total


def test_finish_request_for_stop_strings():
    sched, kv = make_scheduler()
    request = make_request("a", 5, max_tokens=10)
    sched.add_request(request)
    step(sched)
    sched.finish_request("a", "stop", "END")
    assert (request.finish_reason, request.stop_reason) == ("stop", "END")
    assert kv.block_table("a") == [] and not sched.has_unfinished
    assert sched.schedule().finished_ids == ["a"]
    with pytest.raises(ValueError, match="reason"):
        sched.add_request(make_request("b", 5))
        sched.finish_request("b", "bogus")


# ---- abort ---------------------------------------------------------------------------------------
def test_abort_in_every_state():
    sched, kv = make_scheduler(num_pages=6, page_size=4, max_num_batched_tokens=4, max_num_seqs=2)
    waiting = make_request("waiting", 4, arrival=3)
    prefilling = make_request("prefilling", 12, arrival=1)
    decoding = make_request("decoding", 3, arrival=0, max_tokens=50)
    for request in (decoding, prefilling, waiting):
        sched.add_request(request)
    step(sched)  # decoding: its 3-token prompt; prefilling: 1 token of its prompt
    step(sched)
    assert decoding.num_output_tokens == 2 and prefilling.status == RequestStatus.RUNNING
    assert 0 < prefilling.num_computed_tokens < 12 and waiting.status == RequestStatus.WAITING

    sched.abort_request("waiting")
    assert waiting.finish_reason == "abort" and sched.num_waiting == 0
    sched.abort_request("prefilling")
    assert prefilling.status == RequestStatus.FINISHED_ABORTED and kv.block_table("prefilling") == []
    sched.abort_request("unknown")
    sched.abort_request("prefilling")  # twice: no-op
    out, _ = step(sched)
    assert out.finished_ids == ["waiting", "prefilling"]
    assert [c.request_id for c in out.chunks] == ["decoding"]
    sched.abort_request("decoding")
    assert kv.num_free_pages == kv.pages_total and not sched.has_unfinished
    assert sched.schedule().finished_ids == ["decoding"]


def test_abort_preempted_request():
    sched, kv = make_scheduler(num_pages=4, page_size=2, max_num_batched_tokens=8, max_num_seqs=2)
    first = make_request("first", 2, arrival=0, max_tokens=10)
    second = make_request("second", 2, arrival=1, max_tokens=10)
    sched.add_request(first)
    sched.add_request(second)
    for _ in range(3):
        step(sched)
    assert second.status == RequestStatus.PREEMPTED and sched.num_preemptions == 1
    sched.abort_request("second")
    assert second.finish_reason == "abort" and sched.num_waiting == 0
    run_to_completion(sched)
    assert kv.num_free_pages == kv.pages_total


def test_update_ignores_requests_aborted_after_schedule():
    sched, kv = make_scheduler()
    sched.add_request(make_request("a", 5))
    out = sched.schedule()
    sched.abort_request("a")
    assert sched.update(out, {"a": TOKEN}) == []
    assert kv.num_free_pages == kv.pages_total


# ---- preemption ----------------------------------------------------------------------------------
def test_preemption_by_recompute_then_all_complete():
    # 6 usable pages of 2 tokens; three requests that each grow to 8 tokens (4 pages): they cannot all fit.
    sched, kv = make_scheduler(num_pages=7, page_size=2, max_num_batched_tokens=16, max_num_seqs=3)
    requests = [make_request(f"r{i}", 3, arrival=i, max_tokens=5) for i in range(3)]
    for request in requests:
        sched.add_request(request)
    outs, preempted_seen = [], []
    while sched.has_unfinished:
        out, _ = step(sched)
        outs.append(out)
        kv.check_invariants()
        for rid in out.preempted_ids:
            victim = sched.get_request(rid)
            preempted_seen.append(rid)
            assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
            assert kv.block_table(rid) == [] and sched.waiting[0] is victim or victim in sched.waiting
        assert len(outs) < 100
    assert preempted_seen and sched.num_preemptions == len(preempted_seen)
    assert preempted_seen[0] == "r2"  # the most recently arrived goes first
    assert all(r.num_output_tokens == 5 and r.finish_reason == "length" for r in requests)
    assert kv.num_free_pages == kv.pages_total
    # The recompute of a preempted request covers its prompt and the outputs it had, in one chunk.
    victim = requests[2]
    recompute = [c for out in outs for c in out.chunks if c.request_id == "r2" and c.start_pos == 0][-1]
    assert len(recompute.token_ids) > 3 and recompute.token_ids[:3] == victim.prompt_token_ids
    assert recompute.token_ids[3:] == victim.output_token_ids[: len(recompute.token_ids) - 3]
    assert sched.prompt_tokens_computed > 9


def test_preempted_request_goes_to_the_front_of_waiting():
    sched, _ = make_scheduler(num_pages=4, page_size=2, max_num_batched_tokens=8, max_num_seqs=2)
    sched.add_request(make_request("a", 2, arrival=0, max_tokens=10))
    sched.add_request(make_request("b", 2, arrival=2, max_tokens=10))
    step(sched)
    sched.add_request(make_request("c", 2, arrival=1, max_tokens=10))  # older than b, but never ran
    while not sched.num_preemptions:
        step(sched)
    assert [r.request_id for r in sched.waiting] == ["b", "c"]


def test_no_admission_in_a_step_that_preempted():
    # The pool was just too small for the running requests: admitting more would only thrash.
    sched, _ = make_scheduler(num_pages=5, page_size=2, max_num_batched_tokens=8, max_num_seqs=2)
    sched.add_request(make_request("a", 2, arrival=0, priority=0, max_tokens=10))
    sched.add_request(make_request("b", 2, arrival=1, priority=1, max_tokens=10))
    step(sched)
    sched.add_request(make_request("c", 1, arrival=2, priority=0, max_tokens=10))  # would fit in a free page
    while not sched.num_preemptions:
        out, _ = step(sched)
    assert out.preempted_ids == ["b"] and [c.request_id for c in out.chunks] == ["a"]
    out, _ = step(sched)
    assert [c.request_id for c in out.chunks] == ["a", "c"]


def test_request_that_can_never_fit_is_finished_with_length():
    sched, kv = make_scheduler(num_pages=4, page_size=2, max_model_len=64)  # 3 pages = 6 tokens
    too_long = make_request("too_long", 7)
    sched.add_request(too_long)
    sched.add_request(make_request("ok", 2, arrival=1, max_tokens=2))
    out, _ = step(sched)
    assert out.finished_ids == ["too_long"] and too_long.finish_reason == "length"
    assert too_long.num_output_tokens == 0
    assert [c.request_id for c in out.chunks] == ["ok"]
    # Alone in the pool and still growing: it ends when no page is left rather than spinning.
    grows = make_request("grows", 4, max_tokens=100)
    sched.add_request(grows)
    run_to_completion(sched)
    assert grows.finish_reason == "length" and grows.num_tokens == 7
    assert sched.num_preemptions == 0  # finished in place, not preempted first
    assert kv.num_free_pages == kv.pages_total


# ---- priorities ----------------------------------------------------------------------------------
def test_priority_orders_admission():
    sched, _ = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("low", 3, arrival=0, priority=5))
    sched.add_request(make_request("high", 3, arrival=1, priority=-1))
    sched.add_request(make_request("mid", 3, arrival=2))
    order = []
    while sched.has_unfinished:
        out, _ = step(sched)
        order += [c.request_id for c in out.chunks if c.request_id not in order]
    assert order == ["high", "mid", "low"]


def test_priority_picks_the_preemption_victim():
    sched, _ = make_scheduler(num_pages=5, page_size=2, max_num_batched_tokens=8, max_num_seqs=2)
    important = make_request("important", 2, arrival=1, priority=0, max_tokens=10)
    unimportant = make_request("unimportant", 2, arrival=0, priority=1, max_tokens=10)
    sched.add_request(unimportant)
    sched.add_request(important)
    while not sched.num_preemptions:
        out, _ = step(sched)
    assert out.preempted_ids == ["unimportant"] and important.status == RequestStatus.RUNNING


# ---- prefix cache --------------------------------------------------------------------------------
def test_prefix_hit_skips_cached_tokens():
    sched, kv = make_scheduler()
    prompt = list(range(18))
    sched.add_request(make_request("a", prompt, max_tokens=1))
    run_to_completion(sched)
    b = make_request("b", prompt, max_tokens=1)
    sched.add_request(b)
    out, _ = step(sched)
    (chunk,) = out.chunks
    assert (chunk.start_pos, len(chunk.token_ids)) == (16, 2)
    assert b.num_cached_tokens == 16 and sched.prompt_tokens_computed == 18 + 2
    assert kv.prefix_cache_hit_rate == pytest.approx(16 / 36)


def test_shared_prefix_is_computed_once_then_hit():
    sched, kv = make_scheduler(max_num_batched_tokens=256, max_num_seqs=8)
    system = list(range(200, 220))  # 5 full pages
    for i in range(4):
        sched.add_request(make_request(f"s{i}", system + [i, i], arrival=0, max_tokens=2))
    sched.add_request(make_request("other", 10, arrival=1, max_tokens=2))
    out, _ = step(sched)
    assert [c.request_id for c in out.chunks] == ["s0", "other"]  # the rest wait for s0's pages
    out, _ = step(sched)
    admitted = [c for c in out.chunks if c.start_pos > 0 and len(c.token_ids) > 1]
    assert [c.request_id for c in admitted] == ["s1", "s2", "s3"]
    assert all(c.start_pos == 20 and len(c.token_ids) == 2 for c in admitted)
    run_to_completion(sched)
    assert sched.prompt_tokens_computed == 22 + 10 + 3 * 2


def test_n_siblings_share_the_prompt_pages():
    sched, kv = make_scheduler(max_num_batched_tokens=256, max_num_seqs=8)
    prompt = list(range(300, 317))  # 4 full pages + 1 token
    siblings = [make_request(f"p-{i}", prompt, arrival=0, max_tokens=3) for i in range(3)]
    for request in siblings:
        sched.add_request(request)
    step(sched)
    step(sched)
    tables = [kv.block_table(r.request_id) for r in siblings]
    assert tables[0][:4] == tables[1][:4] == tables[2][:4]
    assert siblings[1].num_cached_tokens == siblings[2].num_cached_tokens == 16
    kv.check_invariants()
    run_to_completion(sched)
    assert sched.prompt_tokens_computed == 17 + 1 + 1


def test_followers_wait_for_a_chunked_leader():
    sched, _ = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    prompt = list(range(700, 740))  # 10 pages, prefilled 8 tokens a step
    for i in range(3):
        sched.add_request(make_request(f"n-{i}", prompt, max_tokens=1))
    admitted_at = {}
    for step_no in range(8):
        out, _ = step(sched)
        for chunk in out.chunks:
            admitted_at.setdefault(chunk.request_id, (step_no, chunk.start_pos))
    # The siblings wait until the leader has computed the 36 tokens they may hit (never the last token).
    assert admitted_at == {"n-0": (0, 0), "n-1": (5, 36), "n-2": (5, 36)}
    run_to_completion(sched)
    assert sched.prompt_tokens_computed == 40 + 4 + 4


def test_deferral_waits_only_for_the_shared_part_of_a_chunked_leader():
    sched, _ = make_scheduler(max_num_batched_tokens=12, max_num_seqs=4)
    shared = list(range(400, 408))  # 2 pages
    sched.add_request(make_request("leader", shared + list(range(500, 508)), arrival=0, max_tokens=1))
    sched.add_request(make_request("follower", shared + [1, 2, 3], arrival=1, max_tokens=1))
    out, _ = step(sched)
    assert [(c.request_id, len(c.token_ids)) for c in out.chunks] == [("leader", 12)]
    # The leader's prefill is not done, but the part it shares with the follower is: no need to wait more.
    out, _ = step(sched)
    assert [(c.request_id, c.start_pos) for c in out.chunks] == [("leader", 12), ("follower", 8)]


def test_deferral_ends_when_the_leader_leaves():
    sched, _ = make_scheduler(max_num_batched_tokens=8, max_num_seqs=4)
    prompt = list(range(600, 630))
    sched.add_request(make_request("leader", prompt, arrival=0))
    sched.add_request(make_request("follower", prompt, arrival=1, max_tokens=1))
    out, _ = step(sched)
    assert [c.request_id for c in out.chunks] == ["leader"]
    sched.abort_request("leader")
    out, _ = step(sched)
    assert [(c.request_id, c.start_pos) for c in out.chunks] == [("follower", 8)]  # hits the leader's pages


def test_no_deferral_without_prefix_caching():
    sched, _ = make_scheduler(caching=False, max_num_batched_tokens=256)
    for i in range(3):
        sched.add_request(make_request(f"s{i}", list(range(200, 220)), max_tokens=1))
    out, _ = step(sched)
    assert len(out.chunks) == 3


def test_host_modules_do_not_import_jax():
    # A fresh interpreter whose import system refuses jax: the traceback names the import chain that asked.
    code = (
        "import sys, traceback\n"
        "class NoJax:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('jax', 'jaxlib'):\n"
        "            raise ImportError('jax imported by:\\n' + ''.join(traceback.format_stack()))\n"
        "sys.meta_path.insert(0, NoJax())\n"
        "import jserve.engine.request, jserve.engine.kv_cache, jserve.engine.scheduler\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


# ---- property test: a simulated engine loop ------------------------------------------------------
@dataclass
class Spec:
    request_id: str
    arrival_step: int
    prompt: list[int]
    params: SamplingParams
    abort_step: int | None
    stop_string_after: int | None  # the "engine" finishes it (stop string) after this many outputs


@st.composite
def scenarios(draw):
    page_size = draw(st.sampled_from([1, 2, 4]))
    max_model_len = draw(st.integers(2, 40))
    # Mostly pools that hold one longest request but not many (preemption), sometimes ones that hold none.
    fits_one = -(-max_model_len // page_size) + 1
    tiny = draw(st.integers(0, 4)) == 0
    num_pages = draw(st.integers(2, fits_one) if tiny else st.integers(fits_one, fits_one + 12))
    chunked = draw(st.booleans())
    max_num_seqs = draw(st.integers(1, 5))
    budget = draw(st.integers(max_num_seqs, 24))
    if not chunked:
        budget = max(budget, max_model_len)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
    )
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=draw(st.booleans()))
    prefix = draw(st.lists(st.integers(1, 3), max_size=12))
    specs = []
    for i in range(draw(st.integers(1, 10))):
        prompt = (prefix + draw(st.lists(st.integers(0, 5), max_size=12)))[:max_model_len] or [1]
        max_tokens = draw(st.integers(1, 16))
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=draw(st.integers(0, max_tokens)),
            ignore_eos=draw(st.booleans()),
            priority=draw(st.sampled_from([0, 0, 1, -1])),
            stop_token_ids=draw(st.sampled_from([None, [5]])),
            prompt_logprobs=draw(st.sampled_from([None, None, 1])),
        )
        arrival = draw(st.integers(0, 5))
        for k in range(draw(st.sampled_from([1, 1, 2, 3]))):  # n > 1: siblings with one prompt
            specs.append(
                Spec(
                    f"r{i}-{k}",
                    arrival,
                    prompt,
                    params,
                    abort_step=draw(st.integers(0, 30)) if draw(st.integers(0, 3)) == 0 else None,
                    stop_string_after=draw(st.integers(1, 6)) if draw(st.integers(0, 3)) == 0 else None,
                )
            )
    return config, kv, specs, draw(st.integers(0, 2**32 - 1))


def check_step(sched: Scheduler, kv: KVCacheManager, out: SchedulerOutput) -> None:
    config = sched.config
    assert out.num_batched_tokens == sum(len(c.token_ids) for c in out.chunks) <= config.max_num_batched_tokens
    assert len(out.chunks) <= config.max_num_seqs and sched.num_running <= config.max_num_seqs
    assert len({c.request_id for c in out.chunks}) == len(out.chunks)
    for chunk in out.chunks:
        request = sched.get_request(chunk.request_id)
        assert request is not None and request.status == RequestStatus.RUNNING
        end = chunk.start_pos + len(chunk.token_ids)
        assert chunk.token_ids and chunk.start_pos == request.num_computed_tokens
        assert chunk.token_ids == request.all_token_ids[chunk.start_pos : end]
        assert chunk.sample == (end == request.num_tokens)
        assert chunk.block_table == kv.block_table(chunk.request_id)
        assert len(chunk.block_table) * kv.page_size >= end
        if not config.enable_chunked_prefill:
            assert chunk.sample
    check_state(sched, kv)


def check_state(sched: Scheduler, kv: KVCacheManager) -> None:
    kv.check_invariants()
    for request in sched.running:
        assert request.status == RequestStatus.RUNNING
        assert len(kv.block_table(request.request_id)) * kv.page_size >= request.num_computed_tokens
    for request in sched.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert kv.block_table(request.request_id) == [] and request.num_computed_tokens == 0
    assert set(kv._tables) <= {r.request_id for r in sched.running}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_simulated_engine_loop(scenario):
    config, kv, specs, seed = scenario
    sched = Scheduler(config, kv)
    rng = random.Random(seed)
    requests: dict[str, Request] = {}
    finish_events: Counter[str] = Counter()
    aborted: set[str] = set()
    stopped_by_engine: set[str] = set()
    pending = sorted(specs, key=lambda s: s.arrival_step)
    step_no = 0
    while pending or sched.has_unfinished:
        while pending and pending[0].arrival_step <= step_no:
            spec = pending.pop(0)
            request = Request(
                spec.request_id,
                spec.prompt,
                spec.params,
                eos_token_ids=[EOS],
                arrival_time=float(spec.arrival_step),
            )
            requests[spec.request_id] = request
            sched.add_request(request)
        for spec in specs:
            if spec.abort_step == step_no and spec.request_id in requests:
                if not requests[spec.request_id].is_finished:
                    aborted.add(spec.request_id)
                sched.abort_request(spec.request_id)
        check_state(sched, kv)

        out = sched.schedule()
        check_step(sched, kv, out)
        finish_events.update(out.finished_ids)
        sampled = {c.request_id: rng.randrange(6) for c in out.chunks if c.sample}
        updated = sched.update(out, sampled)
        assert [r.request_id for r in updated] == list(sampled)
        for request in updated:
            if request.is_finished:
                finish_events[request.request_id] += 1
                assert sched.get_request(request.request_id) is None
        for spec in specs:  # engine-side stop strings
            request = requests.get(spec.request_id)
            if (
                request is not None
                and not request.is_finished
                and spec.stop_string_after is not None
                and request.num_output_tokens >= spec.stop_string_after
            ):
                stopped_by_engine.add(spec.request_id)
                sched.finish_request(spec.request_id, "stop", "STOP")
        check_state(sched, kv)
        step_no += 1
        assert step_no < 5000, "the scheduler made no progress"
    finish_events.update(sched.schedule().finished_ids)  # flush aborts/stops made after the last step

    assert finish_events == Counter({rid: 1 for rid in requests}), "every request finishes exactly once"
    assert len(requests) == len(specs)
    assert kv.num_free_pages == kv.pages_total and kv._tables == {}
    assert all(kv._refcount[p] == 0 for p in kv._page_to_hash)
    assert kv.num_cached_pages == len(kv._page_to_hash)
    kv.check_invariants()
    for request in requests.values():
        check_outcome(request, config, kv, aborted, stopped_by_engine)


def check_outcome(
    request: Request,
    config: SchedulerConfig,
    kv: KVCacheManager,
    aborted: set[str],
    stopped_by_engine: set[str],
) -> None:
    params, out = request.sampling_params, request.output_token_ids
    assert request.is_finished and request.num_computed_tokens <= request.num_tokens
    assert len(out) <= params.max_tokens
    stops = set(request.eos_token_ids) | set(params.stop_token_ids)
    for j, token in enumerate(out[:-1]):  # no stop was missed before the last token
        assert j + 1 < params.min_tokens or token not in stops
    if request.finish_reason == "abort":
        assert request.request_id in aborted
    elif request.finish_reason == "length":
        assert (
            len(out) == params.max_tokens
            or request.num_tokens >= config.max_model_len
            or kv.pages_needed(request.num_tokens) > kv.pages_total
        )
    elif request.stop_reason == "STOP":
        assert request.request_id in stopped_by_engine
    else:
        assert request.finish_reason == "stop" and out[-1] in stops and len(out) >= params.min_tokens
        assert request.stop_reason == (None if out[-1] in request.eos_token_ids else out[-1])


def test_async_advance_then_resolve():
    """Async scheduling: step N+1 is scheduled with step N's token pending; an EOS found late costs the one
    token N+1 computed, which is discarded, and the pages come back."""
    sched, kv = make_scheduler(page_size=4)
    sched.add_request(make_request("a", [1, 2, 3, 4, 5], max_tokens=10))
    sched.add_request(make_request("b", [6, 7], max_tokens=2))
    first = sched.schedule()
    sched.advance(first)  # dispatched; tokens not on the host yet
    second = sched.schedule()
    by_id = {c.request_id: c for c in second.chunks}
    assert by_id["a"].token_ids == [PENDING_TOKEN] and by_id["a"].start_pos == 5
    assert by_id["b"].token_ids == [PENDING_TOKEN]
    sched.advance(second)
    third = sched.schedule()
    assert [c.request_id for c in third.chunks] == ["a"]  # b's max_tokens=2 is reached by its pending tokens
    sched.advance(third)
    updated = sched.resolve(first, {"a": EOS, "b": TOKEN})
    a = next(r for r in updated if r.request_id == "a")
    assert a.is_finished and a.finish_reason == "stop" and a.output_token_ids == [EOS] and a.num_tokens == 6
    assert [r.request_id for r in sched.resolve(second, {"a": TOKEN, "b": TOKEN})] == ["b"]  # a's: discarded
    assert sched.resolve(third, {"a": TOKEN}) == []
    assert not sched.has_unfinished and kv.num_free_pages == kv.pages_total


def test_drafts_take_only_pages_no_decode_needs():
    """Speculative decoding: a request's drafts are allocated after every running request's plain decode has
    its pages, so drafts never push another request out (here the drafts' pages would have preempted b)."""
    sched, kv = make_scheduler(num_pages=5, page_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    a, b = make_request("a", 4, max_tokens=10), make_request("b", 4, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # both prompts (one page each); each sampled a 5th token, which needs a second page
    a.draft_token_ids = [11, 12, 13, 14]  # would need a third page
    out = sched.schedule()
    assert not out.preempted_ids
    assert {c.request_id: c.num_drafts for c in out.chunks} == {"a": 0, "b": 0}
    sched.update(out, {"a": TOKEN, "b": TOKEN})
    # with pages to spare, the drafts go in
    sched2, _ = make_scheduler(num_pages=8, page_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    c = make_request("c", 4, max_tokens=10)
    sched2.add_request(c)
    step(sched2)
    c.draft_token_ids = [11, 12, 13, 14]
    assert [ch.num_drafts for ch in sched2.schedule().chunks] == [4]


def test_accepted_drafts_after_a_stop_token_are_not_counted():
    sched, _ = make_scheduler(num_pages=8, page_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    request = make_request("a", 4, max_tokens=10)
    sched.add_request(request)
    step(sched)
    request.draft_token_ids = [11, EOS, 13]
    out = sched.schedule()
    assert out.chunks[0].num_drafts == 3
    # all three drafts accepted, plus the target's own token; EOS (the second draft) ends the request
    sched.update(out, {"a": 14}, {"a": [11, EOS, 13, 14]})
    assert request.output_token_ids == [TOKEN, 11, EOS]
    assert (request.num_draft_tokens, request.num_accepted_tokens) == (3, 2)
