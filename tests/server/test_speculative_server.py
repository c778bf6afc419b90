"""Speculative decoding through the server: launch flags, the per-request opt-out, ModelInfo and Prometheus."""

from __future__ import annotations

import pytest

from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from tests.server.harness import ServerProcess, metric_value, scrape

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add_v2(a, b):\n"


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(
        "--speculative-model",
        "ngram",
        "--num-speculative-tokens",
        "3",
        "--no-speculative-adaptive",  # the counters below need drafts in every step
        "--max-num-seqs",
        "4",
        "--max-num-batched-tokens",
        "64",
        "--max-model-len",
        "256",
        "--metrics-port",
        "0",
    ).start()
    yield proc
    proc.stop()


def _generate(server, **sampling) -> list[int]:
    with server.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(temperature=0, **sampling))
        return [t for r in stub.Generate(request, timeout=120) for t in r.token_ids]


def test_speculation_is_reported_and_can_be_declined(server):
    before = server.model_info()
    assert before.speculative_method == "ngram"
    tokens = _generate(server, max_tokens=24)
    info = server.model_info()
    assert info.spec_num_draft_tokens > before.spec_num_draft_tokens
    assert info.spec_num_accepted_tokens > before.spec_num_accepted_tokens
    assert _generate(server, max_tokens=24, speculative=False) == tokens  # the same greedy text either way
    assert server.model_info().spec_num_draft_tokens == info.spec_num_draft_tokens
    samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    spec = {"method": "ngram", "model_name": "tiny-pycoder"}
    drafted = metric_value(samples, "jserve:spec_decode_num_draft_tokens_total", **spec)
    accepted = metric_value(samples, "jserve:spec_decode_num_accepted_tokens_total", **spec)
    assert drafted == info.spec_num_draft_tokens and 0 < accepted <= drafted
    assert metric_value(samples, "jserve:spec_decode_num_drafts_total", **spec) > 0
    assert metric_value(samples, "jserve:spec_decode_acceptance_rate", **spec) == pytest.approx(accepted / drafted)
