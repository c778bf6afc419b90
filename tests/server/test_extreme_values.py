"""One bad request never fails the engine: every numeric field drawn from its type's extremes, through every
interface.

A value out of range is refused naming the field (offline ``ValueError``, gRPC ``INVALID_ARGUMENT`` or
``RESOURCE_EXHAUSTED``, HTTP 4xx); one in range completes normally. Never a 5xx, an INTERNAL, a crash or a hang
(every call has a deadline), and after every example the server is still SERVING on gRPC health and HTTP
/health. At the end neither engine has had a failed step (``num_step_failures``) and the server has answered
no call with an engine error. Proto int32 fields cannot carry values past int32 (the client refuses to build the
message), so gRPC draws what the wire can carry; JSON carries anything, NaN and Infinity included.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jserve import LLM, SamplingParams
from jserve.limits import DEFAULT_MAX_STOP_STRING_CHARS, DEFAULT_MAX_STOP_STRINGS, DEFAULT_MAX_STOP_TOKEN_IDS
from jserve.sampling_params import FLOAT32_MAX, FLOAT32_TINY
from jserve.server.gen import jetstream_pb2, jetstream_pb2_grpc, jserve_pb2, jserve_pb2_grpc
from tests.server.harness import ServerProcess, metric_value, scrape

MAX_MODEL_LEN = 64
VOCAB = 4096  # the bundled model's
EXAMPLES = 40
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CALL_TIMEOUT = 120.0  # seconds: a call that takes longer is a hang

I32_MAX, I32_MIN = 2**31 - 1, -(2**31)
I64_MAX, I64_MIN = 2**63 - 1, -(2**63)
INT32_EXTREMES = (0, -1, 1, 2, I32_MAX, I32_MIN, I32_MIN + 1)
INT64_EXTREMES = (*INT32_EXTREMES, 2**31, -(2**31) - 1, I64_MAX, I64_MIN)
INT_EXTREMES = (*INT64_EXTREMES, 2**63, 2**64 - 1, 2**64, I64_MIN - 1, 10**30)
FLOAT32_EXTREMES = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -2.0, math.nan, math.inf, -math.inf, 1e-45, -1e-45, FLOAT32_TINY)
FLOAT32_EXTREMES += (FLOAT32_MAX, -FLOAT32_MAX, 2.0**31)
FLOAT_EXTREMES = (*FLOAT32_EXTREMES, 1e39, -1e39, 1e-300, 1.7976931348623157e308)

INT_FIELDS = ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_LEADING_FIELD = re.compile(r"^([a-z_]+)\b")


def _ints(extremes: tuple[int, ...]) -> st.SearchStrategy[int]:
    """Extremes, and small values so that some requests are valid and run."""
    return st.sampled_from(extremes) | st.integers(-2, 5)


def _floats(extremes: tuple[float, ...], ints: tuple[int, ...]) -> st.SearchStrategy[float | int]:
    return st.sampled_from(extremes) | st.sampled_from(ints) | st.floats(-3, 3)


def _stop_ids(values: tuple[int, ...]) -> st.SearchStrategy[list[int]]:
    """A few ids, or lists at (and one past) the length limit full of one value."""
    full = st.builds(
        lambda value, size: [value] * size,
        st.sampled_from(values) | st.integers(0, VOCAB - 1),
        st.sampled_from((DEFAULT_MAX_STOP_TOKEN_IDS, DEFAULT_MAX_STOP_TOKEN_IDS + 1)),
    )
    return st.lists(st.sampled_from(values) | st.integers(0, VOCAB - 1), max_size=4) | full


def _stops() -> st.SearchStrategy[list[str]]:
    longest = "s" * DEFAULT_MAX_STOP_STRING_CHARS
    return st.sampled_from(
        ([], ["\n"], [longest] * DEFAULT_MAX_STOP_STRINGS, [longest + "s"], ["x"] * (DEFAULT_MAX_STOP_STRINGS + 1))
    )


def _sampling(
    ints: tuple[int, ...], floats: tuple[float, ...], extra: dict[str, st.SearchStrategy] | None = None
) -> st.SearchStrategy[dict]:
    """Up to four sampling fields (and ``extra`` ones), each drawn from the extremes (the others take their
    defaults): few enough that a fair share of the requests is valid and runs with its extreme values."""
    fields = {name: _ints(ints) for name in INT_FIELDS} | (extra or {})
    fields.update({name: _floats(floats, ints) for name in FLOAT_FIELDS})
    fields["stop_token_ids"] = _stop_ids(ints)
    fields["stop"] = _stops()
    names = st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)
    return names.flatmap(lambda chosen: st.fixed_dictionaries({name: fields[name] for name in chosen}))


def _token_prompts(values: tuple[int, ...]) -> st.SearchStrategy[list[int]]:
    """Token prompts: a few ids from the extremes, or one that just fits (and one that just does not)."""
    longest = st.builds(lambda n: [VOCAB - 1] * n, st.sampled_from((MAX_MODEL_LEN - 1, MAX_MODEL_LEN)))
    return st.lists(st.sampled_from(values) | st.integers(0, VOCAB - 1), min_size=1, max_size=3) | longest


def _refusal_names(message: str, drawn: set[str]) -> None:
    """A refusal names a field the request set (or the prompt / n, which limits and pool checks name)."""
    match = _LEADING_FIELD.match(message)
    allowed = drawn | {"prompt", "prompt_token_ids", "token_ids", "n", "num_samples", "token_content"}
    assert match is not None and match.group(1) in allowed, (message, drawn)


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # --max-n 2: the largest accepted request (64 prompts x n x 63 tokens) takes ~30 s on 2 CPU cores, not ~80
    args = ("--max-num-seqs", "4", "--max-n", "2", "--max-model-len", str(MAX_MODEL_LEN), "--drain-timeout", "5")
    proc = ServerProcess("--http-port", "0", *args).start()
    try:
        yield proc
        _assert_serving(proc)
        samples = scrape(f"http://127.0.0.1:{proc.http_port}/metrics")
        assert metric_value(samples, "jserve:engine_step_failures_total") == 0, proc.log()
        assert metric_value(samples, "jserve:requests_total", outcome="error") == 0, proc.log()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=4,
        num_pages=64,
        max_num_batched_tokens=64,
        precompile=False,
        progress=False,
    )


def _assert_serving(server: ServerProcess) -> None:
    assert server.proc.poll() is None, server.log()
    assert httpx.get(f"http://127.0.0.1:{server.http_port}/health", timeout=10).status_code == 200, server.log()
    with server.channel() as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING, server.log()


# ---------------------------------------------------------------------------------------------------- Python API


@SETTINGS
@given(
    fields=_sampling(INT_EXTREMES, FLOAT_EXTREMES),
    tokens=st.none() | _token_prompts(INT_EXTREMES),
)
def test_python_api(llm, fields, tokens):
    try:
        params = SamplingParams(**fields)
        if tokens is None:
            out = llm.generate("def f(x):", params, use_tqdm=False)[0]
        else:
            out = llm.generate(prompt_token_ids=[tokens], sampling_params=params, use_tqdm=False)[0]
    except ValueError as e:
        _refusal_names(str(e), set(fields))
        event("refused")
        return
    event("completed")
    assert out.finished and len(out.outputs) == params.n
    for c in out.outputs:
        assert c.finish_reason in ("stop", "length"), c
        assert len(c.token_ids) <= params.max_tokens and all(0 <= t < VOCAB for t in c.token_ids)
        if params.logprobs is not None:
            assert len(c.logprobs) == len(c.token_ids)
            assert all(t in e and not math.isnan(e[t]) for t, e in zip(c.token_ids, c.logprobs, strict=True))


def test_python_engine_had_no_failed_step(llm):
    """After the examples above (same module, same worker): nothing they did failed a step."""
    assert llm.engine.stats()["num_step_failures"] == 0
    assert llm.generate("still fine", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


# ---------------------------------------------------------------------------------------------------- gRPC


@SETTINGS
@given(
    fields=_sampling(INT32_EXTREMES, FLOAT32_EXTREMES),
    seed=st.none() | st.sampled_from(INT64_EXTREMES),  # the one int64 field
    tokens=st.none() | _token_prompts(INT32_EXTREMES),
)
def test_grpc_generate(server, fields, seed, tokens):
    fields = {k: (float(v) if k in FLOAT_FIELDS else v) for k, v in fields.items() if k != "seed"}
    if seed is not None:
        fields["seed"] = seed
    request = jserve_pb2.GenerateRequest(sampling=jserve_pb2.SamplingParams(**fields))
    if tokens is None:
        request.prompt = "def f(x):"
    else:
        request.token_ids[:] = tokens
    with server.channel() as channel:
        try:
            responses = list(jserve_pb2_grpc.GenerationStub(channel).Generate(request, timeout=CALL_TIMEOUT))
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), e
            _refusal_names(e.details(), set(fields))
            event("refused")
            return
        finally:
            _assert_serving(server)
    event("completed")
    assert responses and responses[-1].finished, responses
    n = fields.get("n") or 1
    assert {r.index for r in responses if r.finish_reason} == set(range(n))
    assert all(r.finish_reason in ("", "stop", "length") for r in responses)


@SETTINGS
@given(
    max_tokens=_ints(INT32_EXTREMES),
    num_samples=_ints(INT32_EXTREMES),
    tokens=st.none() | _token_prompts(INT32_EXTREMES),
    has_bos=st.booleans(),
    start_time=st.sampled_from(FLOAT32_EXTREMES),
)
def test_jetstream_decode(server, max_tokens, num_samples, tokens, has_bos, start_time):
    request = jetstream_pb2.DecodeRequest(
        max_tokens=max_tokens,
        num_samples=num_samples,
        has_bos=has_bos,
        metadata=jetstream_pb2.DecodeRequest.Metadata(start_time=start_time),
    )
    if tokens is None:
        request.text_content.text = "def f(x):"
    else:
        request.token_content.token_ids[:] = tokens
    with server.channel() as channel:
        try:
            responses = list(jetstream_pb2_grpc.OrchestratorStub(channel).Decode(request, timeout=CALL_TIMEOUT))
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), e
            _refusal_names(e.details(), {"max_tokens", "num_samples"})
            event("refused")
            return
        finally:
            _assert_serving(server)
    event("completed")
    n = max(num_samples, 1)
    assert all(len(r.stream_content.samples) == n for r in responses)
    generated = sum(len(r.stream_content.samples[0].token_ids) for r in responses)
    assert generated <= max_tokens


# ---------------------------------------------------------------------------------------------------- HTTP


def _post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    """NaN and Infinity go out as the JSON extensions Python's parser (the server's) reads."""
    content = json.dumps(body, allow_nan=True)
    return httpx.post(
        f"http://127.0.0.1:{server.http_port}{path}",
        content=content,
        headers={"content-type": "application/json"},
        timeout=CALL_TIMEOUT,
    )


def _check_http(server: ServerProcess, response: httpx.Response, drawn: set[str]) -> None:
    """4xx naming a field, or a 200 whose stream (if any) ran to ``[DONE]`` without an error event."""
    _assert_serving(server)
    assert response.status_code < 500, response.text
    event(f"HTTP {response.status_code}")
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"], error
        if response.status_code == 400:
            _refusal_names(error["message"], drawn)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text
        assert not any('"error"' in e and json.loads(e).get("error") for e in events[:-1]), response.text
    else:
        assert response.json()["choices"], response.text


def _http_fields(**extra: st.SearchStrategy) -> st.SearchStrategy[dict]:
    """The sampling fields and ``extra`` ones (not prompt_logprobs: the OpenAI API spells it echo + logprobs)."""
    fields = _sampling(INT_EXTREMES, FLOAT_EXTREMES, extra)
    return fields.map(lambda f: {k: v for k, v in f.items() if k != "prompt_logprobs"})


@SETTINGS
@given(
    fields=_http_fields(best_of=_ints(INT_EXTREMES), echo=st.booleans()),
    prompt=st.sampled_from(("def f(x):", ["x"] * 64, ["x"] * 65)) | _token_prompts(INT_EXTREMES),
    stream=st.booleans(),
)
def test_http_completions(server, fields, prompt, stream):
    body = {"model": "tiny-pycoder", "prompt": prompt, "stream": stream, **fields}
    _check_http(server, _post(server, "/v1/completions", body), set(body))


@SETTINGS
@given(
    fields=_http_fields(top_logprobs=_ints(INT_EXTREMES), max_completion_tokens=_ints(INT_EXTREMES)),
    stream=st.booleans(),
)
def test_http_chat_completions(server, fields, stream):
    """``logprobs: k`` is sent as chat's ``logprobs: true, top_logprobs: k``."""
    body = {"model": "tiny-pycoder", "messages": [{"role": "user", "content": "Hi"}], "stream": stream, **fields}
    if "logprobs" in fields:
        body["logprobs"], body["top_logprobs"] = True, fields["logprobs"]
    _check_http(server, _post(server, "/v1/chat/completions", body), set(body))
