"""Prompt logprobs of a request preempted mid-prompt: its recompute chunks may straddle the positions it had
recorded (the token budget cuts them elsewhere the second time); every position is still recorded once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from jserve.engine.batch import PromptLogprobRows
from jserve.engine.output import RequestGroup
from jserve.sampling_params import SamplingParams


def _result(rows: int, first_position: int, prompt: list[int]) -> SimpleNamespace:
    """A step's prompt-logprob outputs whose row j holds position first_position + j + 1 (logprob = -position)."""
    positions = [first_position + j + 1 for j in range(rows)]
    return SimpleNamespace(
        prompt_top_ids=np.array([[prompt[min(p, len(prompt) - 1)], 0] for p in positions]),
        prompt_top_logprobs=np.array([[-float(p), -99.0] for p in positions]),
        prompt_target_logprobs=np.array([-float(p) for p in positions]),
    )


def _record(group: RequestGroup, start: int, count: int) -> None:
    group.record_prompt_logprobs(PromptLogprobRows("r", 0, count, start), _result(count, start, group.prompt_token_ids))


def test_recompute_chunks_that_straddle_what_was_recorded():
    prompt = list(range(100, 120))  # 20 tokens: positions 1..19 have logprobs
    group = RequestGroup("r", None, prompt, SamplingParams(prompt_logprobs=1), 0.0, {}, prompt_logprobs=[None])
    _record(group, 0, 7)  # first pass: positions 1..7, then preempted
    _record(group, 0, 12)  # the recompute's first chunk, cut elsewhere: 1..7 again, then 8..12 new
    _record(group, 12, 8)  # its second chunk: 13..19 (and the last prompt token's row, ignored)
    assert len(group.prompt_logprobs) == len(prompt)
    assert [group.prompt_logprobs[p][prompt[p]] for p in range(1, 20)] == [-float(p) for p in range(1, 20)]


def test_a_later_chunk_before_an_earlier_one_records_nothing_out_of_order():
    prompt = list(range(100, 110))
    group = RequestGroup("r", None, prompt, SamplingParams(prompt_logprobs=1), 0.0, {}, prompt_logprobs=[None])
    _record(group, 5, 4)
    assert group.prompt_logprobs == [None]
