"""The step builders on inputs small enough to check by hand (page size 4, 3 sequence rows, buckets 8/16)."""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _layout_one_chunk_at_a_time(chunks, shapes, t, previous_rows):
    """The layout as the definition reads: each chunk's tokens, positions and slots in turn."""
    tokens, token_src, positions, slots = (np.full(t, v, np.int32) for v in (0, -1, 0, 0))
    tables = np.zeros((shapes.max_num_seqs, shapes.max_pages_per_seq), np.int32)
    kv_lens, cu = np.zeros(shapes.max_num_seqs, np.int32), np.zeros(shapes.max_num_seqs + 1, np.int32)
    cursor = 0
    for i, chunk in enumerate(chunks):
        for j, token in enumerate(chunk.token_ids):
            pos = chunk.start_pos + j
            pending = token == PENDING_TOKEN
            tokens[cursor + j] = 0 if pending else token
            token_src[cursor + j] = previous_rows[chunk.request_id] if pending else -1
            positions[cursor + j] = pos
            slots[cursor + j] = chunk.block_table[pos // shapes.page_size] * shapes.page_size + pos % shapes.page_size
        tables[i, : len(chunk.block_table)] = chunk.block_table
        kv_lens[i] = chunk.start_pos + len(chunk.token_ids)
        cu[i] = cursor
        cursor += len(chunk.token_ids)
    cu[len(chunks) :] = cursor
    return tokens, token_src, positions, slots, tables, kv_lens, cu


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(1, 6), st.booleans()), max_size=3))
def test_build_layout_matches_a_chunk_by_chunk_reference(specs):
    """Random steps (prefill chunks, decodes with a pending token, none at all) on SHAPES."""
    chunks, previous, total = [], {}, 0
    for i, (start, n, pending) in enumerate(specs):
        n = min(n, 16 - start, 16 - total)  # max_pages_per_seq x page_size; the largest bucket
        if n == 0:
            continue
        total += n
        ids = [100 + i * 10 + j for j in range(n)]
        if pending and n == 1:
            ids, previous[f"r{i}"] = [PENDING_TOKEN], i
        table = [1 + 4 * i + p for p in range(-(-(start + n) // SHAPES.page_size))]
        chunks.append(ScheduledChunk(f"r{i}", ids, start, table, sample=True, prompt_logprobs=False))
    t = 8 if sum(len(c.token_ids) for c in chunks) <= 8 else 16
    tokens, token_src, positions, layout = build_layout(chunks, SHAPES, t, previous_rows=previous)
    got = (tokens, token_src, positions, layout.slot_mapping, layout.block_tables, layout.kv_lens, layout.cu_q_lens)
    for name, a, b in zip(
        "tokens src positions slots tables kv_lens cu".split(),
        got,
        _layout_one_chunk_at_a_time(chunks, SHAPES, t, previous),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(layout.num_seqs, [len(chunks)])


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


def test_verification_buckets_sample_about_one_row_per_k_plus_one_tokens():
    """A lone request verifying k drafts runs the smallest bucket and samples one row (not ``spec_rows``); a
    step with more rows than its tokens' bucket samples takes the bucket that samples them all."""
    shapes = StepShapes.from_limits(
        max_num_batched_tokens=64,
        max_num_seqs=8,
        max_model_len=128,
        page_size=16,
        banned_len=2,
        spec_rows=4,
        num_spec_tokens=7,
    )
    assert shapes.spec_token_buckets == (8, 16, 32)
    assert [shapes.verify_rows(b) for b in shapes.spec_token_buckets] == [1, 2, 4]
    assert shapes.verify_bucket(8, 1) == 8
    assert shapes.verify_bucket(6, 3) == 32  # three rows of two tokens: bucket 8 samples only one
    assert shapes.verify_bucket(9, 2) == 16
    assert shapes.verify_bucket(20, 5) is None  # more rows than any verification program holds
    assert shapes.verify_bucket(33, 1) is None
