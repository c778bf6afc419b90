"""Wire translation rules in jserve.server.protocol, without a server."""

from __future__ import annotations

import pytest

from jserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jserve.sampling_params import SamplingParams
from jserve.server.gen import jserve_pb2 as pb
from jserve.server.protocol import ResponseBuilder, sampling_from_proto


def test_unset_fields_take_sampling_params_defaults():
    assert sampling_from_proto(pb.SamplingParams()) == SamplingParams()
    params = sampling_from_proto(pb.SamplingParams(temperature=0.0, top_k=0, seed=0, stop=["\n"]))
    assert (params.temperature, params.top_k, params.seed, params.stop) == (0.0, 0, 0, ["\n"])


def test_float32_wire_values_read_back_as_written():
    params = sampling_from_proto(pb.SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05))
    assert (params.temperature, params.top_p, params.min_p) == (0.8, 0.95, 0.05)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.1$"):
        sampling_from_proto(pb.SamplingParams(top_p=1.1))


def _out(completions, finished, prompt=(1, 2, 3)):
    return RequestOutput(
        "r", None, list(prompt), None, completions, finished, RequestMetrics(arrival_time=0.0, num_cached_tokens=0)
    )


def test_n_samples_split_and_usage_on_last_response():
    builder = ResponseBuilder()
    first = builder.build(_out([CompletionOutput(0, "a", [5]), CompletionOutput(1, "b", [6])], False))
    assert [(r.index, list(r.token_ids), r.finished) for r in first] == [(0, [5], False), (1, [6], False)]
    last = builder.build(
        _out(
            [
                CompletionOutput(0, "", [7], finish_reason="length"),
                CompletionOutput(1, "", [], finish_reason="stop", stop_reason=2),
            ],
            True,
        )
    )
    assert [r.finish_reason for r in last] == ["length", "stop"]
    assert last[1].stop_token_id == 2 and last[1].finished and not last[0].finished
    assert (last[1].usage.prompt_tokens, last[1].usage.completion_tokens) == (3, 3)


def test_logprobs_list_the_actual_token_and_sorted_alternatives():
    sample = CompletionOutput(0, "x", [9], logprobs=[{4: -0.5, 9: -2.0}])
    (resp,) = ResponseBuilder().build(_out([sample], False))
    (lp,) = resp.logprobs
    assert (lp.token_id, lp.logprob) == (9, -2.0)
    assert [t.token_id for t in lp.top] == [4, 9]
