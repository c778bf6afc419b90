"""The host KV tier through the server (--kv-offloading-size): conversations whose history no longer fits the
device pool come back from the host tier, GetModelInfo and /metrics show both tiers, nothing compiles."""

from __future__ import annotations

import httpx
import pytest

from jserve.server.gen import jserve_pb2 as pb
from tests.server.harness import ServerProcess, metric_value, scrape

LABELS = {"model_name": "tiny-pycoder"}


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(
        "--http-port", "0", "--metrics-port", "0", "--max-num-seqs", "2", "--max-num-batched-tokens", "128",
        "--max-model-len", "256", "--page-size", "16", "--num-pages", "24", "--kv-offloading-size", "0.01",
        precompile=True,  # the copy programs too: restoring pages must compile nothing
    ).start()  # fmt: skip
    yield proc
    assert proc.stop() == 0


def _turn(server, history: str) -> str:
    body = {"model": "tiny-pycoder", "prompt": history, "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"http://127.0.0.1:{server.http_port}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_conversations_come_back_from_the_host_tier(server):
    histories = [
        f"# conversation {i}\n" + "".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(8)) for i in range(4)
    ]
    for _ in range(2):
        for i, history in enumerate(histories):
            histories[i] = history + _turn(server, history) + f"\n# next {i}\n"
    info = server.model_info()
    assert info.host_pages_total > 0 and info.host_pages_used > 0
    assert info.host_cache_hit_tokens > 0
    samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert metric_value(samples, "jserve:prefix_cache_host_hits_total", **LABELS) == info.host_cache_hit_tokens
    assert metric_value(samples, "jserve:kv_offload_pages_to_device_total", **LABELS) > 0
    assert metric_value(samples, "jserve:kv_host_pages_total", **LABELS) == info.host_pages_total
    assert metric_value(samples, "jserve:programs_lowered_while_serving_total", **LABELS) == 0
    assert isinstance(info, pb.ModelInfo)
