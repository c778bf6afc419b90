"""A server started with precompile="background" (the launch default): SERVING once its first programs exist,
/metrics says how far the build is, a request answers at once, and SIGTERM while programs are still being built
stops it cleanly (exit 0, well inside the drain watchdog), with the cache it leaves usable."""

from __future__ import annotations

import time

from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from tests.server.harness import ServerProcess, metric_value, scrape

GREEDY = pb.GenerateRequest(
    token_ids=[1, 20, 30, 40], sampling=pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
)


def _server(cache) -> ServerProcess:
    return ServerProcess(
        "--metrics-port",
        "0",
        "--max-num-seqs",
        "4",
        "--max-model-len",
        "128",
        "--max-num-batched-tokens",
        "64",  # buckets 8, 16, 32, 64: ready with 8 and 64, then 16 and 32 in the background
        "--compilation-cache-dir",
        str(cache),
        precompile="background",
        env={"JAX_COMPILATION_CACHE_DIR": str(cache)},
    )


def _tokens(server: ServerProcess) -> list[int]:
    with server.channel() as channel:
        return [t for r in pb_grpc.GenerationStub(channel).Generate(GREEDY, timeout=60) for t in r.token_ids]


def test_ready_before_everything_is_built_and_sigterm_mid_build_exits_cleanly(tmp_path):
    cache = tmp_path / "xla"
    server = _server(cache).start(timeout=300)
    try:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        samples = scrape(url)
        expected = metric_value(samples, "jserve:compiled_programs_expected")
        assert metric_value(samples, "jserve:compiled_programs") < expected  # 16 and 32 take seconds to compile
        with server.channel() as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        first = _tokens(server)
        assert len(first) == 8
        start = time.monotonic()
        server.send_signal()  # programs still compiling in the background
        assert server.wait(60) == 0, server.log()
        assert time.monotonic() - start < 30
    finally:
        server.kill()

    again = _server(cache).start(timeout=300)
    try:
        assert _tokens(again) == first
        deadline = time.monotonic() + 300
        url = f"http://127.0.0.1:{again.metrics_port}/metrics"
        while time.monotonic() < deadline:
            samples = scrape(url)
            if metric_value(samples, "jserve:compiled_programs") == expected:
                break
            time.sleep(0.2)
        assert metric_value(samples, "jserve:compiled_programs") == expected
        assert metric_value(samples, "jserve:programs_lowered_while_serving_total") == 0
        assert _tokens(again) == first
    finally:
        again.kill()
