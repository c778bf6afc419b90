"""The step builders on inputs small enough to check by hand (page size 4, 3 sequence rows, buckets 8/16)."""

from __future__ import annotations

import jax
import numpy as np

from jserve.attention.xla_page_loop import XlaPageLoopBackend
from jserve.engine.batch import build_layout, build_prompt_logprobs, build_sampling, build_step, padding_step
from jserve.engine.request import PENDING_TOKEN, Request
from jserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from jserve.engine.shapes import StepShapes
from jserve.sampling_params import SamplingParams

SHAPES = StepShapes(
    token_buckets=(8, 16), max_num_seqs=3, max_pages_per_seq=4, page_size=4, history_len=16, banned_len=2
)


def _requests() -> dict[str, Request]:
    a = Request("a", [10, 11, 12, 13, 14, 15], SamplingParams(prompt_logprobs=1))  # prefill chunk 2..5
    b = Request("b", [20, 21], SamplingParams(temperature=0.5, seed=3, repetition_penalty=1.2))
    b.append_output_token(22)
    b.add_pending_token()  # async: its 2nd output token is still on the device
    return {"a": a, "b": b}


def _chunks() -> list[ScheduledChunk]:
    return [
        ScheduledChunk("a", [12, 13, 14, 15], 2, [7, 8], sample=True, prompt_logprobs=True),
        ScheduledChunk("b", [PENDING_TOKEN], 3, [5], sample=True, prompt_logprobs=False),
    ]


def test_build_layout():
    tokens, token_src, positions, layout = build_layout(_chunks(), SHAPES, 8, previous_rows={"b": 2})
    np.testing.assert_array_equal(tokens, [12, 13, 14, 15, 0, 0, 0, 0])  # the pending token reads 0 ...
    np.testing.assert_array_equal(token_src, [-1, -1, -1, -1, 2, -1, -1, -1])  # ... and comes from row 2
    np.testing.assert_array_equal(positions, [2, 3, 4, 5, 3, 0, 0, 0])
    # page 7 holds positions 0-3 of "a" (slots 28-31), page 8 positions 4-7; "b" position 3 -> page 5 slot 23
    np.testing.assert_array_equal(layout.slot_mapping, [30, 31, 32, 33, 23, 0, 0, 0])
    np.testing.assert_array_equal(layout.block_tables, [[7, 8, 0, 0], [5, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(layout.kv_lens, [6, 4, 0])
    np.testing.assert_array_equal(layout.cu_q_lens, [0, 4, 5, 5])
    np.testing.assert_array_equal(layout.num_seqs, [2])


def test_build_sampling():
    requests = _requests()
    sampling, logits_indices, ids, history_src, history_col = build_sampling(
        _chunks(),
        requests,
        SHAPES,
        seed_of=lambda r: 100 + ord(r.request_id),
        banned_ids_of=lambda r: [0],
        previous_rows={"b": 2},
    )
    assert ids == ["a", "b"]
    np.testing.assert_array_equal(logits_indices, [3, 4, 0])
    np.testing.assert_allclose(sampling.temperature, [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(sampling.seeds, [197, 198, 0])
    np.testing.assert_array_equal(sampling.steps, [0, 2, 0])  # b samples its 3rd token (one pending)
    np.testing.assert_array_equal(sampling.banned_token_ids, [[0, -1], [0, -1], [-1, -1]])
    assert sampling.token_history.shape == (3, 16)
    np.testing.assert_array_equal(sampling.token_history[1, :4], [20, 21, 22, -1])  # pending: filled on device
    np.testing.assert_array_equal(history_src, [-1, 2, -1])
    np.testing.assert_array_equal(history_col, [0, 3, 0])


def test_build_prompt_logprobs():
    targets, rows = build_prompt_logprobs(_chunks(), _requests(), 8)
    # rows 0..3 hold prompt positions 2..5 of "a": the next prompt tokens are 13, 14, 15, then none
    np.testing.assert_array_equal(targets, [13, 14, 15, -1, -1, -1, -1, -1])
    assert [(r.request_id, r.start, r.count, r.first_position) for r in rows] == [("a", 0, 4, 2)]


def test_build_step_and_padding_step():
    backend = XlaPageLoopBackend(SHAPES)
    plan = build_step(SchedulerOutput(_chunks(), 5), _requests(), SHAPES, lambda r: 0, lambda r: (), {"b": 0})
    assert plan.bucket == 8 and plan.num_tokens == 5 and plan.sampled_ids == ["a", "b"]
    assert plan.uses_penalties and plan.reads_previous and not plan.wants_top_logprobs
    empty = padding_step(SHAPES, 16)
    assert empty.bucket == 16 and not empty.reads_previous and empty.sampled_ids == []

    def shapes(p):
        return [leaf.shape for leaf in jax.tree.leaves(p.inputs)]

    assert shapes(padding_step(SHAPES, 8)) == shapes(plan)  # only the bucket picks the shape
    backend = XlaPageLoopBackend(SHAPES)
    assert backend.plan(plan.inputs.attention) is plan.inputs.attention  # the page loop reads the layout as is
