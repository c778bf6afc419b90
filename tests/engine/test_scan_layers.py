"""scan_layers=True (layers in a loop over stacked params) against unrolled layers on the bundled model: the same
greedy tokens and logprobs through chunked prefill, prefix hits, an int8 KV cache and both device drafters
(early exit drafts from the first layers of the stack); no program lowered while serving."""

from __future__ import annotations

import numpy as np
import pytest

from jserve import BUNDLED_DRAFT_MODEL, BUNDLED_MODEL, LLM, SamplingParams
from jserve.models.layer_stack import LayerStack, find_period
from jserve.stdlib_corpus import function_sources
from tests.engine.workloads import assert_no_leak
from tests.lowerings import count_lowerings

SETTINGS = dict(
    dtype="float32",
    max_num_seqs=4,
    max_num_batched_tokens=64,  # prompts over 64 tokens prefill in chunks
    max_model_len=256,
    num_pages=40,
    progress=False,
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize(
    ("signatures", "period"),
    [("aaaa", 1), ("abab", 2), ("ababa", 2), ("aaaaab" * 2 + "aa", 6), ("abc", 3), ("aba", 2), ("a", 1), ("ab", 2)],
)
def test_find_period(signatures, period):
    assert find_period(list(signatures)) == period


def test_layer_stack_positions():
    stack = LayerStack(start=2, stop=9, period=3)  # layers 2..8: two whole periods and one layer after
    assert [list(stack.members(r)) for r in range(3)] == [[2, 5, 8], [3, 6], [4, 7]]
    assert [stack.locate(i) for i in (2, 4, 5, 8)] == [(0, 0), (2, 0), (0, 1), (0, 2)]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    sources = [source[:300] for _, source in function_sources(max_lines=10)][:4]
    return [sources[0], sources[0] + "\n" + sources[1][:80], sources[2][:40], sources[3]]  # 2nd: a prefix hit


def _run(llm: LLM, prompts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_no_leak(llm)
    results = []
    for out in outs:
        tokens = out.outputs[0].token_ids
        results.append((tokens, np.array([lp[t] for lp, t in zip(out.outputs[0].logprobs, tokens, strict=True)])))
    return results


def _assert_same(ours, reference) -> None:
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(ours, reference, strict=True):
        assert tokens == ref_tokens
        np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def unrolled(prompts):
    return _run(LLM(BUNDLED_MODEL, precompile=False, **SETTINGS), prompts)


def test_scanned_engine_matches_unrolled_and_never_compiles_while_serving(prompts, unrolled):
    llm = LLM(BUNDLED_MODEL, scan_layers=True, **SETTINGS)
    with count_lowerings() as lowered:
        ours = _run(llm, prompts)
        ours_again = _run(llm, prompts)  # every prompt a prefix hit now
    assert lowered == []
    _assert_same(ours, unrolled)
    _assert_same(ours_again, unrolled)


def test_scanned_int8_kv_cache_matches_unrolled(prompts):
    """The scales of an int8 cache move with their pages' layer offsets."""
    reference = _run(LLM(BUNDLED_MODEL, kv_cache_dtype="int8", precompile=False, **SETTINGS), prompts)
    ours = _run(LLM(BUNDLED_MODEL, kv_cache_dtype="int8", scan_layers=True, precompile=False, **SETTINGS), prompts)
    _assert_same(ours, reference)


@pytest.mark.parametrize(  # the draft model's stack is the unrolled one's (only the target scans): slow
    "drafter",
    ["early_exit", pytest.param(str(BUNDLED_DRAFT_MODEL), marks=pytest.mark.slow)],
    ids=["early_exit", "draft"],
)
def test_scanned_speculation_is_lossless(prompts, unrolled, drafter):
    """Greedy speculation emits plain decoding's tokens; early exit drafts through the stack's first layers and
    writes their pages in the stage's one buffer."""
    llm = LLM(
        BUNDLED_MODEL,
        scan_layers=True,
        speculative_model=drafter,
        num_speculative_tokens=3,
        speculative_adaptive=False,
        precompile=False,
        **SETTINGS,
    )
    ours = _run(llm, prompts)
    assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in unrolled]
    assert llm.stats()["spec_num_draft_tokens"] > 0
