"""Overload, drain on SIGTERM, engine failure and bad flags, each against its own server process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.server.gen import jetstream_pb2, jetstream_pb2_grpc
from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from tests.server.harness import REPO_ROOT, ServerProcess

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _long_request(max_tokens: int = 1500) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=[1, 20, 30, 40], sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )


def _health(channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_full_queue_is_resource_exhausted_at_once():
    server = ServerProcess("--max-queue-size", "2").start()
    try:

        async def run() -> tuple[grpc.StatusCode, float]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.GenerationStub(channel)
                running = [stub.Generate(_long_request()) for _ in range(2)]
                for call in running:
                    await call.read()  # both admitted and streaming
                start = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.Generate(_long_request()):
                        pass
                elapsed = time.monotonic() - start
                for call in running:
                    call.cancel()
                return info.value.code(), elapsed

        code, elapsed = asyncio.run(run())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert elapsed < 2.0
        info = server.wait_pages_free(server.model_info().pages_total)
        assert info.num_running == 0
        with server.channel() as channel:  # capacity is back
            responses = list(pb_grpc.GenerationStub(channel).Generate(_long_request(3), timeout=60))
            assert responses[-1].finished
    finally:
        assert server.stop() == 0


def test_sigterm_drains_in_flight_streams_and_exits_0():
    server = ServerProcess("--drain-timeout", "60").start()

    async def run() -> tuple[list[list[pb.GenerateResponse]], grpc.StatusCode, list[int]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING
            calls = [stub.Generate(_long_request(40)) for _ in range(3)]
            firsts = [await call.read() for call in calls]
            server.send_signal()
            statuses = []
            for _ in range(100):  # health flips while the streams are still running
                statuses.append((await health.Check(health_pb2.HealthCheckRequest())).status)
                if statuses[-1] == NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Generate(_long_request(2)):
                    pass
            streams = []
            for first, call in zip(firsts, calls, strict=True):
                responses = [first]
                while (r := await call.read()) is not grpc.aio.EOF:
                    responses.append(r)
                streams.append(responses)
            return streams, refused.value.code(), statuses

    try:
        streams, refused, statuses = asyncio.run(run())
    except BaseException:
        server.kill()
        raise
    assert statuses[-1] == NOT_SERVING
    assert refused == grpc.StatusCode.UNAVAILABLE
    for responses in streams:
        assert sum(len(r.token_ids) for r in responses) == 40
        assert responses[-1].finished and responses[-1].finish_reason == "length"
    assert server.wait(60) == 0
    assert "jserve: stopped" in server.log()


def test_engine_failure_is_internal_and_not_serving():
    server = ServerProcess("--debug-fail-after-steps", "3").start()
    try:

        async def run() -> list[grpc.StatusCode]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.GenerationStub(channel)

                async def one() -> grpc.StatusCode:
                    try:
                        async for _ in stub.Generate(_long_request(50), timeout=60):
                            pass
                    except grpc.aio.AioRpcError as e:
                        return e.code()
                    return grpc.StatusCode.OK

                return await asyncio.gather(*(one() for _ in range(4)))

        codes = asyncio.run(run())
        assert codes == [grpc.StatusCode.INTERNAL] * 4
        with server.channel() as channel:
            deadline = time.monotonic() + 10
            while _health(channel) != NOT_SERVING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _health(channel) == NOT_SERVING
            assert _health(channel, "jserve.v1.Generation") == NOT_SERVING
            orchestrator = jetstream_pb2_grpc.OrchestratorStub(channel)
            live = orchestrator.HealthCheck(jetstream_pb2.HealthCheckRequest())
            assert not live.is_live
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:  # later calls fail fast, nobody hangs
                list(pb_grpc.GenerationStub(channel).Generate(_long_request(5), timeout=30))
            assert info.value.code() == grpc.StatusCode.INTERNAL and time.monotonic() - start < 5
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantization-group-size", "64"], "quantization_group_size"),  # without --quantization
        (["--tensor-parallel-size", "4"], "tensor_parallel_size"),  # one CPU device here
        (["--speculative-model", "ngram"], "num_speculative_tokens"),  # k missing
        (["--num-processes", "2"], "--coordinator-address"),
        (["--model", "/nonexistent/model"], "not a directory"),
    ],
)
def test_unsupported_flags_exit_2(flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "jserve.launch", "--port", "0", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
