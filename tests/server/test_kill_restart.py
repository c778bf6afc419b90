"""kill -9 and restart: a server killed at any moment leaves a cache the next one starts from.

Three servers share one compilation cache directory of the test's own, all with ``--precompile`` (every step
program built, and written to jserve's executable cache, before ready):

1. the first is SIGKILLed in the middle of writing its first executable entry (a test hook writes half of it
   to the writer's temporary file, then kills the process);
2. the second starts on what the first left (it removes the dead writer's temporary file), answers a greedy
   request, and is SIGKILLed in the middle of a gRPC and an HTTP stream: both clients see an error at once
   rather than waiting for their deadline;
3. two of the largest entries are then damaged as a writer without the rename would leave them (one truncated,
   one empty); the third server must reach SERVING, load the intact entries, give the same greedy tokens as the
   second, and have rewritten the damaged entries (jserve/executable_cache.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.compilation_cache import ENTRY_SUFFIX
from jserve.executable_cache import KILL_MID_WRITE_ENV, entry_is_valid
from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from tests.server.harness import ServerProcess

GREEDY = pb.GenerateRequest(
    token_ids=[1, 20, 30, 40], sampling=pb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
)
LONG_TOKENS = 50  # at --debug-step-delay 0.05, a stream of ~2.5 s: the kill lands in its middle
DEAD_PID = 2**22 + 1  # above any pid_max: no process has it


def _server(cache: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(
        "--http-port",
        "0",
        "--max-num-seqs",
        "4",
        "--max-model-len",
        "64",
        "--max-num-batched-tokens",
        "16",  # two step programs (token buckets 8 and 16): each cold compile costs ~15 s on 2 CPU cores
        "--compilation-cache-dir",
        str(cache),
        *extra,
        precompile=True,
        env={"JAX_COMPILATION_CACHE_DIR": str(cache), **(env or {})},
    )


def _entries(cache: Path) -> list[Path]:
    """The executable cache's entries, largest first."""
    return sorted((cache / "executables").glob(f"*{ENTRY_SUFFIX}"), key=lambda p: p.stat().st_size, reverse=True)


def _temporaries(cache: Path) -> list[Path]:
    return list((cache / "executables").glob(".*.tmp"))


def _greedy_tokens(server: ServerProcess) -> list[int]:
    with server.channel() as channel:
        responses = list(pb_grpc.GenerationStub(channel).Generate(GREEDY, timeout=60))
    return [t for r in responses for t in r.token_ids]


def _kill_mid_write(cache: Path) -> None:
    server = _server(cache, env={KILL_MID_WRITE_ENV: "1"}).launch()
    assert server.proc.wait(300) == -9, server.log()
    assert not _entries(cache), "an entry was renamed into place"
    assert _temporaries(cache), f"no half-written temporary file:\n{server.log()}"
    assert not any(line.startswith("jserve: ready") for line in server.stdout_lines), "killed too late"


def _kill_mid_stream(server: ServerProcess) -> None:
    """SIGKILL with a gRPC and an HTTP stream open: each client gets an error within seconds."""
    request = pb.GenerateRequest(
        token_ids=[1, 20, 30, 40], sampling=pb.SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True)
    )
    body = {"model": "tiny-pycoder", "prompt": "def f(x):", "max_tokens": LONG_TOKENS, "ignore_eos": True}
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    with contextlib.ExitStack() as stack:
        channel = stack.enter_context(server.channel())
        call = pb_grpc.GenerationStub(channel).Generate(request, timeout=60)
        assert next(call).token_ids
        client = stack.enter_context(httpx.Client(timeout=60))
        response = stack.enter_context(client.stream("POST", url, json={**body, "stream": True}))
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"
        server.kill()
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as grpc_error:
            for _ in call:
                pass
        assert grpc_error.value.code() == grpc.StatusCode.UNAVAILABLE, grpc_error.value
        with pytest.raises(httpx.HTTPError) as http_error:
            for _ in lines:
                pass
        assert not isinstance(http_error.value, httpx.TimeoutException), http_error.value
        assert time.monotonic() - start < 10


def _damage(cache: Path) -> list[Path]:
    """Truncates the largest entry and empties the second largest."""
    largest, second = _entries(cache)[:2]
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    second.write_bytes(b"")
    return [largest, second]


def test_kill_9_anytime_then_restart_on_the_same_cache(tmp_path):
    cache = tmp_path / "xla"
    _kill_mid_write(cache)

    second = _server(cache, "--debug-step-delay", "0.05").start(timeout=300)
    try:
        assert not _temporaries(cache), "the killed writer's temporary file was left"
        before = _greedy_tokens(second)
        assert len(before) == 12
        _kill_mid_stream(second)
    finally:
        second.kill()

    damaged = _damage(cache)
    third = _server(cache).start(timeout=300)
    try:
        with third.channel() as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert _greedy_tokens(third) == before
        assert all(entry_is_valid(entry) for entry in damaged), [(e.name, e.stat().st_size) for e in damaged]
        assert not _temporaries(cache), os.listdir(cache / "executables")
        log = third.log()
        assert log.count("is damaged") == 2, log
        assert "programs loaded" in log, log
        assert third.stop() == 0, log
    finally:
        third.kill()
