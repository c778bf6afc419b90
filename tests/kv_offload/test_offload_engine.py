"""The host KV tier in the engine: multi-turn conversations on a device pool a quarter of their working set give
the tokens of an engine without the tier (greedy, float32) while computing about what an engine holding
everything computes; with int8 pages, tensor / data / pipeline parallelism, swap preemption, a corrupted host
page, no programs lowered while serving and host memory bounded."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from jserve import LLM, SamplingParams
from tests.engine.workloads import assert_no_leak

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
COMMON = dict(dtype="float32", max_model_len=128, page_size=8, max_num_seqs=4, max_num_batched_tokens=128)
TIGHT = 20  # device pages: about a quarter of the conversations' working set (~70 pages)
ROOMY = 160
HOST_GIB = 0.02  # ~400 host pages of the tiny model: room for every conversation


def converse(llm: LLM, conversations: int = 6, turns: int = 3, seed: int = 0) -> list[list[int]]:
    """Round robin over conversations sharing a system prompt; each turn resends the whole history plus the
    reply and a new user message. Returns every turn's reply."""
    rng = np.random.default_rng(seed)
    system = rng.integers(3, 500, 24).tolist()
    histories = [system + rng.integers(3, 500, 20).tolist() for _ in range(conversations)]
    replies = []
    for _ in range(turns):
        for i, history in enumerate(histories):
            out = llm.generate(prompt_token_ids=[history], sampling_params=GREEDY, use_tqdm=False)[0]
            reply = out.outputs[0].token_ids
            replies.append(reply)
            histories[i] = history + reply + rng.integers(3, 500, 12).tolist()
    return replies


def check_pool(llm: LLM) -> None:
    assert_no_leak(llm)
    for engine in getattr(llm.engine, "replicas", [llm.engine]):
        engine.kv_cache.check_invariants()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Replies and prompt tokens computed of an engine whose pool holds everything (no host tier)."""
    llm = LLM(model=tiny_model_dir, num_pages=ROOMY, **COMMON)
    replies = converse(llm)
    return replies, llm.stats()["prompt_tokens_computed"]


@pytest.fixture(scope="module")
def tiered(tiny_model_dir):
    return LLM(model=tiny_model_dir, num_pages=TIGHT, kv_offloading_size=HOST_GIB, **COMMON)


def test_host_tier_serves_evicted_prefixes(tiny_model_dir, reference, tiered):
    replies, ideal_computed = reference
    without = LLM(model=tiny_model_dir, num_pages=TIGHT, **COMMON)
    assert converse(without) == replies
    assert converse(tiered) == replies
    stats = tiered.stats()
    assert stats["host_pages_restored"] > 0 and stats["host_hit_tokens"] > 0
    assert stats["prompt_tokens_computed"] <= 1.1 * ideal_computed
    assert without.stats()["prompt_tokens_computed"] > 1.5 * ideal_computed  # the tier is what made the difference
    assert stats["programs_lowered_while_serving"] == 0
    assert stats["host_pages_corrupted"] == 0
    # measured before ready: restoring a page beats recomputing it here, so the tier is on
    assert stats["host_tier_active"] == 1
    assert 0 < stats["host_restore_per_page_seconds"] < stats["host_recompute_per_page_seconds"]
    check_pool(tiered)


def test_a_corrupted_host_page_is_recomputed(reference, tiered, caplog):
    """Every host page corrupted: each is found out by its checksum, logged, dropped and recomputed."""
    replies, _ = reference
    assert tiered.reset_prefix_cache()
    converse(tiered, turns=1)  # fill the host tier again
    host = tiered.engine.kv_cache.host
    tiered.engine.offloader.finish_arrived()
    corrupted = sum(host.corrupt(h) for h in list(host._hash_to_page))
    assert corrupted > 0
    with caplog.at_level(logging.ERROR, logger="jserve.kv_offload.host_tier"):
        assert converse(tiered) == replies
    assert tiered.stats()["host_pages_corrupted"] >= 1 and "checksum" in caplog.text
    check_pool(tiered)


def _preempting(llm: LLM, mode: str) -> tuple[list[list[int]], dict]:
    """Six requests of 40 + 40 tokens on the 20-page pool (each needs 10): preemptions, in ``mode``."""
    engine = llm.engine
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, preemption_mode=mode)
    assert llm.reset_prefix_cache()
    before = llm.stats()
    prompts = [np.random.default_rng(i).integers(3, 500, 40).tolist() for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    after = llm.stats()
    check_pool(llm)
    return [o.outputs[0].token_ids for o in outs], {k: after[k] - before[k] for k in before if k.startswith(COUNTED)}


COUNTED = ("num_preemptions", "host_hit_tokens", "prompt_tokens_recomputed")


def test_swap_preemption_brings_pages_back(tiered):
    """A pool too small for the running batch: preempted requests' pages come back from the host tier
    (swap, the default with a tier) instead of being recomputed, with the same tokens."""
    default = tiered.engine.scheduler.config.preemption_mode
    assert default == "swap"
    try:
        recomputed, r_stats = _preempting(tiered, "recompute")
        swapped, s_stats = _preempting(tiered, "swap")
    finally:
        tiered.engine.scheduler.config = dataclasses.replace(tiered.engine.scheduler.config, preemption_mode=default)
    assert swapped == recomputed
    assert r_stats["num_preemptions"] > 0 and s_stats["num_preemptions"] > 0
    assert s_stats["host_hit_tokens"] > 0 and r_stats["host_hit_tokens"] == 0
    assert s_stats["prompt_tokens_recomputed"] < r_stats["prompt_tokens_recomputed"]


def test_int8_pages_travel_with_their_scales(tiny_model_dir):
    """The same engine with its tier switched off gives the reference (the same compiled programs)."""
    llm = LLM(
        model=tiny_model_dir,
        num_pages=TIGHT,
        kv_offloading_size=HOST_GIB,
        kv_cache_dtype="int8",
        precompile=False,
        **COMMON,
    )
    with_tier = converse(llm)
    assert llm.stats()["host_pages_restored"] > 0
    check_pool(llm)
    assert llm.reset_prefix_cache()
    llm.engine.kv_cache.host_active = False
    assert converse(llm) == with_tier


@pytest.mark.parametrize(
    "layout",
    [
        dict(tensor_parallel_size=2, data_parallel_size=2),
        pytest.param(dict(pipeline_parallel_size=2), marks=pytest.mark.slow),  # ~18 s; stages' pages: test_layouts
    ],
)
def test_parallel_layouts(tiny_model_dir, reference, layout):
    """Each tensor-parallel shard moves its heads of a page, each pipeline stage its layers; each data-parallel
    replica has its own host tier (its share of kv_offloading_size)."""
    replies, _ = reference
    llm = LLM(model=tiny_model_dir, num_pages=TIGHT, kv_offloading_size=HOST_GIB, precompile=False, **COMMON, **layout)
    assert converse(llm) == replies
    engines = getattr(llm.engine, "replicas", [llm.engine])
    assert sum(e.kv_cache.host.counters.pages_restored for e in engines) > 0
    if len(engines) > 1:
        assert all(e.kv_cache.host.nbytes <= HOST_GIB * 2**30 / len(engines) for e in engines)
    check_pool(llm)


def test_host_memory_is_bounded(tiny_model_dir):
    """Many more pages offloaded than the tier holds: it never takes more than kv_offloading_size, drops its
    oldest pages, and keeps no copy once it has landed (the process's RSS: test_host_tier)."""
    size = 0.125 / 1024  # 128 KiB: 32 pages of the tiny model
    llm = LLM(model=tiny_model_dir, num_pages=TIGHT, kv_offloading_size=size, precompile=False, **COMMON)
    converse(llm, conversations=12, turns=3, seed=2)
    host = llm.engine.kv_cache.host
    stats = llm.stats()
    assert host.nbytes <= size * 2**30 and stats["host_pages_total"] == host.num_pages
    assert stats["host_pages_offloaded"] > 2 * host.num_pages and stats["host_pages_evicted"] > 0
    assert stats["host_pages_used"] <= host.num_pages
    llm.engine.offloader.finish_arrived()
    assert not llm.engine.offloader._pending
    check_pool(llm)


def test_speculative_decoding_with_the_host_tier(tiny_model_dir, reference):
    """n-gram speculation (drafts take fresh pages, which may evict to the host; rejected drafts' pages are
    trimmed) on the tight pool: every token is plain decoding's. (A draft model's own K/V are not kept in the
    host tier: a request whose prefix came back from it does not draft; test_host_tier checks that.)"""
    replies, _ = reference
    llm = LLM(
        model=tiny_model_dir,
        num_pages=TIGHT,
        kv_offloading_size=HOST_GIB,
        speculative_model="ngram",
        num_speculative_tokens=3,
        speculative_adaptive=False,
        precompile=False,
        **COMMON,
    )
    assert converse(llm) == replies
    stats = llm.stats()
    assert stats["host_pages_restored"] > 0 and stats["spec_num_draft_tokens"] > 0
    check_pool(llm)
