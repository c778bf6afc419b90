"""Admission limits, disconnects and liveness against real server processes (the Admission limits issue).

Every oversize request gets INVALID_ARGUMENT / HTTP 400 at once and the server keeps serving; a request whose
samples can never fit the pool is refused (RESOURCE_EXHAUSTED over gRPC); clients that disconnect (HTTP,
streaming or not, and gRPC, while running or still queued) abort their requests and the pages come back; a
stuck engine turns health NOT_SERVING and SIGTERM still ends the process in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.server.gen import jetstream_pb2, jetstream_pb2_grpc
from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from tests.server.harness import ServerProcess

MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 128
NUM_PAGES = 25  # 24 usable pages of 16 tokens
MAX_BODY = 1 << 20
STEP_DELAY = "0.03"  # seconds per engine step: a 100-token request lasts > 3 s, long enough to disconnect from
MODEL = "tiny-pycoder"  # the bundled model's served name; HTTP requests must name it


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(
        "--http-port",
        "0",
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--num-pages",
        str(NUM_PAGES),
        "--max-message-bytes",
        str(MAX_BODY),
        "--debug-step-delay",
        STEP_DELAY,
        precompile=True,  # every program compiled before ready: the timings below measure aborts, not compiles
    ).start()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.GenerationStub(channel)


def _url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.http_port}{path}"


def _grpc_error(stub, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str, float]:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=30))
    return info.value.code(), info.value.details(), time.monotonic() - start


GRPC_OVERSIZE = [
    (pb.SamplingParams(n=100_000_000), "n: got 100000000; at most 4 allowed (max_n)"),
    (pb.SamplingParams(logprobs=21), "logprobs: got 21; at most 20 allowed (max_logprobs)"),
    (pb.SamplingParams(prompt_logprobs=21), "prompt_logprobs: got 21; at most 20 allowed"),
    (pb.SamplingParams(stop=[f"s{i}" for i in range(17)]), "stop: got 17 strings; at most 16 allowed"),
    (pb.SamplingParams(stop=["y" * 300]), "stop: a stop string has 300 characters"),
    (pb.SamplingParams(stop_token_ids=list(range(65))), "stop_token_ids: got 65 ids; at most 64 allowed"),
]


@pytest.mark.parametrize(("sampling", "message"), GRPC_OVERSIZE, ids=[m.split(":")[0] for _, m in GRPC_OVERSIZE])
def test_grpc_oversize_sampling_is_invalid_argument_at_once(stub, sampling, message):
    code, details, elapsed = _grpc_error(stub, pb.GenerateRequest(token_ids=[1, 5, 6], sampling=sampling))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(message), details
    assert elapsed < 1.0


def test_grpc_oversize_prompts_are_invalid_argument_at_once(stub):
    code, details, elapsed = _grpc_error(stub, pb.GenerateRequest(token_ids=[5] * 200_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("token_ids is too long: 200000 tokens")
    assert elapsed < 1.0
    code, details, elapsed = _grpc_error(stub, pb.GenerateRequest(prompt="a" * 500_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt: 500000 characters cannot fit")
    assert elapsed < 1.0


def test_grpc_request_that_never_fits_is_resource_exhausted(stub, server):
    sampling = pb.SamplingParams(n=4, max_tokens=100, ignore_eos=True)
    code, details, elapsed = _grpc_error(stub, pb.GenerateRequest(token_ids=[1, 2, 3], sampling=sampling))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV pages at once; the pool has 24" in details
    assert elapsed < 1.0
    assert server.model_info().num_waiting == 0


def test_jetstream_num_samples_is_bounded(server):
    with server.channel() as channel:
        stub = jetstream_pb2_grpc.OrchestratorStub(channel)
        request = jetstream_pb2.DecodeRequest(
            token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=[1, 5]),
            max_tokens=2,
            num_samples=100_000_000,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Decode(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("num_samples: got 100000000")


HTTP_OVERSIZE = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 100_000_000}, "n: got 100000000"),
    ("/v1/completions", {"prompt": "hi", "best_of": 100_000_000}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs: got 21; at most 20"),
    ("/v1/completions", {"prompt": ["hi"] * 65}, "prompt: got 65 prompts; at most 64 allowed"),
    ("/v1/completions", {"prompt": "hi", "stop": ["s"] * 17}, "stop: got 17 strings"),
    ("/v1/completions", {"prompt": "hi", "stop": ["s" * 257]}, "stop: a stop string has 257 characters"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [1] * 65}, "stop_token_ids: got 65 ids"),
    ("/v1/completions", {"prompt": [5] * 50_000}, "token_ids is too long: 50000 tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 4, "max_tokens": 100}, "KV pages at once"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}] * 1025},
        "messages: got 1025 messages; at most 1024",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a" * 10_000}]},
        "messages: 10000 characters cannot fit",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
        "top_logprobs: got 21",
    ),
]


@pytest.mark.parametrize(("path", "body", "message"), HTTP_OVERSIZE, ids=[m.split(":")[0] for *_, m in HTTP_OVERSIZE])
def test_http_oversize_requests_are_400_at_once(server, path, body, message):
    start = time.monotonic()
    response = httpx.post(_url(server, path), json={"model": MODEL, **body}, timeout=30)
    assert time.monotonic() - start < 1.0
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_http_body_over_the_limit_is_413(server):
    body = json.dumps({"prompt": "a" * (MAX_BODY + 10)}).encode()
    response = httpx.post(_url(server, "/v1/completions"), content=body, timeout=30)
    assert response.status_code == 413 and "at most 1048576 are accepted" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit still holds while reading
        for _ in range(11):
            yield b" " * (MAX_BODY // 10)

    response = httpx.post(_url(server, "/v1/completions"), content=chunks(), timeout=30)
    assert response.status_code == 413


def test_server_keeps_serving_after_the_refusals(server, stub):
    response = httpx.post(
        _url(server, "/v1/completions"),
        json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "n": MAX_NUM_SEQS, "logprobs": 20, "ignore_eos": True},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert [len(c["logprobs"]["tokens"]) for c in response.json()["choices"]] == [3] * MAX_NUM_SEQS
    responses = list(stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2))))
    assert responses[-1].finished
    info = server.wait_pages_free(server.model_info().pages_total)
    assert info.num_running == 0 and info.num_waiting == 0


# ---------------------------------------------------------------------- disconnects


def _long_body(stream: bool) -> bytes:
    body = {"model": MODEL, "prompt": [1, 5, 6], "max_tokens": 100, "ignore_eos": True, "stream": stream}
    return json.dumps(body).encode()


HTTP_HEADERS = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _post_and_hang_up(server, body: bytes, after: float) -> None:
    """Sends a raw HTTP request and closes the socket ``after`` seconds later without reading the answer."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(f"{HTTP_HEADERS}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(after)


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_http_client_that_disconnects_aborts_its_running_request(server, stream):
    total = server.model_info().pages_total
    _post_and_hang_up(server, _long_body(stream), after=0.5)
    # 100 tokens at >= 30 ms a step would run >= 2 s more; the abort frees everything well before that
    start = time.monotonic()
    info = server.wait_pages_free(total, timeout=5)
    assert info.pages_free == total and info.num_running == 0, info
    assert time.monotonic() - start < 1.5


def _fill_engine(server) -> tuple[grpc.Channel, list]:
    """MAX_NUM_SEQS long gRPC requests, all running (the next request must queue); 4 x 6 pages fill the pool."""
    channel = server.channel()
    stub = pb_grpc.GenerationStub(channel)
    request = pb.GenerateRequest(token_ids=[1, 7, 8], sampling=pb.SamplingParams(max_tokens=80, ignore_eos=True))
    calls = [stub.Generate(request, timeout=60) for _ in range(MAX_NUM_SEQS)]
    for call in calls:
        next(call)  # streaming: admitted and running
    return channel, calls


@contextlib.contextmanager
def _engine_full(server):
    """While inside, the engine runs MAX_NUM_SEQS long requests; afterwards they are cancelled and every page
    must come back."""
    channel, calls = _fill_engine(server)
    try:
        yield
    finally:
        for call in calls:
            call.cancel()
        channel.close()
    total = server.model_info().pages_total
    assert server.wait_pages_free(total).pages_free == total


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_http_client_that_disconnects_while_queued_aborts_the_queued_request(server, stream):
    with _engine_full(server):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            body = _long_body(stream)
            sock.sendall(f"{HTTP_HEADERS}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert _wait_until(lambda: server.model_info().num_waiting == 1)
        assert _wait_until(lambda: server.model_info().num_waiting == 0, timeout=3)
        assert server.model_info().num_running == MAX_NUM_SEQS  # still running the others


def test_grpc_client_that_cancels_while_queued_aborts_the_queued_request(server):
    with _engine_full(server):

        async def queued_then_cancelled() -> None:
            async with grpc.aio.insecure_channel(server.address) as aio_channel:
                call = pb_grpc.GenerationStub(aio_channel).Generate(
                    pb.GenerateRequest(token_ids=[1, 9], sampling=pb.SamplingParams(max_tokens=50))
                )
                await asyncio.to_thread(_wait_until, lambda: server.model_info().num_waiting == 1)
                call.cancel()

        asyncio.run(queued_then_cancelled())
        assert _wait_until(lambda: server.model_info().num_waiting == 0, timeout=3)


# ---------------------------------------------------------------------- liveness


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_stuck_engine_turns_health_not_serving_and_sigterm_still_exits_in_time():
    # every step sleeps 30 s; health must notice after 1 s; SIGTERM with a 2 s drain must end it in < 2 + 5 s
    server = ServerProcess(
        "--http-port", "0", "--debug-step-delay", "30", "--engine-stall-timeout", "1", "--drain-timeout", "2"
    ).start()
    try:
        with server.channel() as channel:
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            call = pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(token_ids=[1, 5], sampling=pb.SamplingParams(max_tokens=4)), timeout=60
            )
            assert _wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
            response = httpx.get(_url(server, "/health"), timeout=10)
            assert response.status_code == 503
            refused = httpx.post(_url(server, "/v1/completions"), json={"model": MODEL, "prompt": "hi"}, timeout=10)
            assert refused.status_code == 503 and "stall timeout" in refused.json()["error"]["message"]
            start = time.monotonic()
            server.send_signal()
            code = server.wait(timeout=15)
            elapsed = time.monotonic() - start
            call.cancel()
        assert code == 3, server.log()  # the drain was cut short
        assert elapsed < 2 + 5, elapsed
    finally:
        server.kill()
