"""jserve.v1 and JetStream over a real server process: parity with LLM, concurrency, cancel, bad input."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jserve.checkpoint import cpu_has_native_bf16
from jserve.server.gen import jetstream_pb2, jetstream_pb2_grpc
from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from tests.server.harness import ServerProcess, metric_value, scrape

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--http-port", "0", "--metrics-port", "0", precompile=True).start()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.GenerationStub(channel)


def _collect(responses) -> dict[int, dict]:
    """Merges a Generate stream per sample index; the last response's usage goes under key -1."""
    merged: dict[int, dict] = {}
    for r in responses:
        s = merged.setdefault(r.index, {"ids": [], "text": "", "finish": "", "logprobs": []})
        s["ids"] += list(r.token_ids)
        s["text"] += r.text
        s["logprobs"] += list(r.logprobs)
        s["finish"] = r.finish_reason or s["finish"]
        if r.finished:
            merged[-1] = {"usage": r.usage}
    return merged


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        list(call()) if callable(call) else list(call)
    return info.value.code(), info.value.details()


def test_streamed_tokens_match_llm_generate(stub):
    from jserve import LLM, SamplingParams

    cases = [
        dict(temperature=0.0, max_tokens=12),
        dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=12),
        dict(n=2, temperature=1.0, seed=11, max_tokens=6),
    ]
    llm = LLM(precompile=False)  # the same programs as the server's, compiled as needed
    for kwargs in cases:
        expected = llm.generate(PROMPTS, SamplingParams(**kwargs), use_tqdm=False)
        for prompt, exp in zip(PROMPTS, expected, strict=True):
            request = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(**kwargs))
            got = _collect(stub.Generate(request))
            for sample in exp.outputs:
                assert got[sample.index]["ids"] == sample.token_ids, (kwargs, prompt)
                assert got[sample.index]["text"] == sample.text
                assert got[sample.index]["finish"] == sample.finish_reason
            assert got[-1]["usage"].prompt_tokens == len(exp.prompt_token_ids)
            assert got[-1]["usage"].completion_tokens == sum(len(s.token_ids) for s in exp.outputs)


def test_logprobs_and_token_prompt(stub):
    ids = stub.Tokenize(pb.TokenizeRequest(text=PROMPTS[0])).token_ids
    got = _collect(
        stub.Generate(
            pb.GenerateRequest(token_ids=ids, sampling=pb.SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))
        )
    )
    assert len(got[0]["logprobs"]) == 4
    for token, lp in zip(got[0]["ids"], got[0]["logprobs"], strict=True):
        assert lp.token_id == token and len(lp.top) >= 3 and lp.logprob <= 0.0
        assert lp.top[0].logprob >= lp.top[-1].logprob


def test_64_concurrent_streams_complete(server):
    async def run() -> list[dict]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationStub(channel)

            async def one(i: int) -> dict:
                params = pb.SamplingParams(max_tokens=8, ignore_eos=True, seed=i)
                return _collect(
                    [
                        r
                        async for r in stub.Generate(
                            pb.GenerateRequest(token_ids=[1, 5 + i % 50, 9, 13], sampling=params)
                        )
                    ]
                )

            return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    for got in results:
        assert len(got[0]["ids"]) == 8 and got[0]["finish"] == "length"
        assert got[-1]["usage"].completion_tokens == 8


def test_cancelled_streams_free_their_pages(server):
    baseline = server.wait_pages_free(server.model_info().pages_total)
    assert baseline.pages_free == baseline.pages_total

    async def run() -> int:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            params = pb.SamplingParams(max_tokens=1500, ignore_eos=True)
            prompts = [[1, *range(100 + i, 140 + i)] for i in range(20)]
            calls = [stub.Generate(pb.GenerateRequest(token_ids=p, sampling=params)) for p in prompts]
            for call in calls:  # every stream is mid-generation
                await call.read()
                await call.read()
            during = await stub.GetModelInfo(pb.GetModelInfoRequest())
            for call in calls:
                call.cancel()
            return during.pages_free

    pages_during = asyncio.run(run())
    assert pages_during < baseline.pages_total
    after = server.wait_pages_free(baseline.pages_total, timeout=4.0)
    assert (after.pages_free, after.num_running, after.num_waiting) == (baseline.pages_total, 0, 0)


def test_deadline_exceeded_aborts(server, stub):
    total = server.model_info().pages_total
    start = time.monotonic()
    code, _ = _code(
        lambda: stub.Generate(
            pb.GenerateRequest(prompt=PROMPTS[1], sampling=pb.SamplingParams(max_tokens=1900, ignore_eos=True)),
            timeout=1.0,
        )
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 5.0
    after = server.wait_pages_free(total, timeout=4.0)  # far less than generating 1500 tokens would take
    assert (after.pages_free, after.num_running) == (total, 0)


BAD_SAMPLING = [
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(seed=-1), "seed"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=50), "prompt_logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[10**6]), "stop_token_ids"),
]
BAD_PROMPTS = [
    (dict(), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="hi", token_ids=[1, 2]), "prompt"),
    (dict(token_ids=[1, 5000]), "prompt_token_ids"),
    (dict(token_ids=[1, -4]), "prompt_token_ids"),
    (dict(token_ids=[7] * 4096), "prompt"),
]


@pytest.mark.parametrize(
    ("request_fields", "field"), [({"sampling": pb.SamplingParams(**s)}, f) for s, f in BAD_SAMPLING] + BAD_PROMPTS
)
def test_bad_input_is_invalid_argument_and_server_keeps_serving(stub, request_fields, field):
    fields = dict(request_fields)
    if "prompt" not in fields and "token_ids" not in fields and "sampling" in fields:
        fields["prompt"] = "hello"
    code, details = _code(lambda: stub.Generate(pb.GenerateRequest(**fields), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details
    good_request = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=2))
    good = _collect(stub.Generate(good_request, timeout=60))
    assert good[-1]["usage"].completion_tokens >= 1


def test_bad_jetstream_and_detokenize_inputs(server, stub):
    code, details = _code(lambda: stub.Detokenize(pb.DetokenizeRequest(token_ids=[1, 99999])).text)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in details
    with server.channel() as channel:
        orchestrator = jetstream_pb2_grpc.OrchestratorStub(channel)
        text = jetstream_pb2.DecodeRequest.TextContent(text="hello")
        cases = [
            (dict(max_tokens=4), "content"),
            (dict(max_tokens=0, text_content=text), "max_tokens"),
            (dict(max_tokens=4, text_content=text, lora_adapter_id="x"), "lora_adapter_id"),
        ]
        for fields, field in cases:
            request = jetstream_pb2.DecodeRequest(**fields)
            code, details = _code(lambda request=request: orchestrator.Decode(request, timeout=30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details


def test_jetstream_decode_streams_text(server, stub):
    expected = _collect(
        stub.Generate(pb.GenerateRequest(prompt=PROMPTS[0], sampling=pb.SamplingParams(temperature=0.0, max_tokens=8)))
    )[0]
    with server.channel() as channel:
        orchestrator = jetstream_pb2_grpc.OrchestratorStub(channel)
        assert orchestrator.HealthCheck(jetstream_pb2.HealthCheckRequest()).is_live
        responses = list(
            orchestrator.Decode(
                jetstream_pb2.DecodeRequest(
                    max_tokens=8, text_content=jetstream_pb2.DecodeRequest.TextContent(text=PROMPTS[0])
                )
            )
        )
        assert len(responses) >= 2  # streamed, not one blob
        assert all(r.WhichOneof("content") == "stream_content" for r in responses)
        ids = [t for r in responses for t in r.stream_content.samples[0].token_ids]
        text = "".join(r.stream_content.samples[0].text for r in responses)
        assert ids == expected["ids"] and text == expected["text"]
        prompt_ids = list(stub.Tokenize(pb.TokenizeRequest(text=PROMPTS[0])).token_ids)
        by_tokens = list(
            orchestrator.Decode(
                jetstream_pb2.DecodeRequest(
                    max_tokens=8, token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=prompt_ids)
                )
            )
        )
        assert [t for r in by_tokens for t in r.stream_content.samples[0].token_ids] == expected["ids"]


def test_tokenize_detokenize_model_info(stub):
    ids = list(stub.Tokenize(pb.TokenizeRequest(text="Hello world")).token_ids)
    assert ids[0] == 1  # BOS
    bare = stub.Tokenize(pb.TokenizeRequest(text="Hello world", add_special_tokens=False)).token_ids
    assert list(bare) == ids[1:]
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text == "Hello world"
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model_name, info.vocab_size, info.page_size) == ("tiny-pycoder", 4096, 16)
    assert info.max_model_len > 0 and info.pages_total > 0 and info.parallel.tensor_parallel_size == 1
    # the bf16 checkpoint runs in bf16 on CPUs that compute it natively, else in float32
    dtype, size = ("bfloat16", 2) if cpu_has_native_bf16() else ("float32", 4)
    assert (info.quantization, info.dtype, info.kv_cache_dtype) == ("", dtype, dtype)
    assert info.kv_bytes_per_token == 2 * 4 * 4 * 32 * size  # K and V x 4 layers x 4 kv heads x head_dim 32
    assert info.weight_bytes > 4_000_000 * size  # 4.2M params


def test_health_and_reflection(server):
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "jserve.v1.Generation", "jetstream_proto.Orchestrator"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        query = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = reflection.ServerReflectionInfo(iter([query]))
        names = {s.name for s in reply.list_services_response.service}
        assert {"jserve.v1.Generation", "jetstream_proto.Orchestrator", "grpc.health.v1.Health"} <= names


def test_message_size_limit(stub):
    code, _ = _code(lambda: stub.Generate(pb.GenerateRequest(prompt="x" * (17 << 20)), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_openai_client_completes_and_streams(server):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
    (model,) = client.models.list().data
    assert model.id == "tiny-pycoder"
    done = client.completions.create(model=model.id, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(model=model.id, prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    chat = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "Hi!"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    streamed = list(
        client.chat.completions.create(
            model=model.id,
            messages=[{"role": "user", "content": "Hi!"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=model.id, prompt="hi", top_p=3.0)


def test_metrics_endpoint(server, stub):
    list(stub.Generate(pb.GenerateRequest(prompt="metrics", sampling=pb.SamplingParams(max_tokens=3))))
    with pytest.raises(grpc.RpcError):
        list(stub.Generate(pb.GenerateRequest(prompt="metrics", sampling=pb.SamplingParams(top_k=-2))))
    samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    for name in (
        "jserve:requests_total",
        "jserve:request_success_total",
        "jserve:time_to_first_token_seconds_bucket",
        "jserve:request_time_per_output_token_seconds_bucket",
        "jserve:inter_token_latency_seconds_bucket",
        "jserve:e2e_request_latency_seconds_bucket",
        "jserve:request_queue_time_seconds_bucket",
        "jserve:num_requests_running",
        "jserve:num_requests_waiting",
        "jserve:kv_cache_usage_perc",
        "jserve:kv_cache_pages_used",
        "jserve:prefix_cache_hit_rate",
        "jserve:num_preemptions_total",
    ):
        assert name in samples, name
        assert all(labels.get("model_name") == "tiny-pycoder" for labels, _ in samples[name]), name
    assert metric_value(samples, "jserve:requests_total", outcome="length") >= 1
    assert metric_value(samples, "jserve:requests_total", outcome="invalid") >= 1
    assert metric_value(samples, "jserve:request_success_total", finished_reason="length") >= 1


def test_openai_stream_disconnect_aborts(server):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
    total = server.model_info().pages_total
    stream = client.completions.create(
        model="tiny-pycoder", prompt=PROMPTS[1], max_tokens=1500, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()
    after = server.wait_pages_free(total, timeout=4.0)  # far less than generating 1500 tokens would take
    assert (after.pages_free, after.num_running) == (total, 0)


def test_serving_after_ready_lowers_no_program(server, stub):
    """Once health says SERVING, a mixed workload (every sampling option, logprobs, prompt logprobs, n > 1,
    stop strings, long and short prompts, concurrent streams, cancels) lowers no XLA program: the server counts
    jax's lowering events since ready and exports them."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    assert "jserve: compiling" in server.log()  # the progress bar, before ready
    rng = random.Random(5)
    options = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_p=0.8, seed=1),
        dict(temperature=0.7, top_k=10, min_p=0.05),
        dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
        dict(temperature=1.0, logprobs=5, prompt_logprobs=3),
        dict(temperature=0.8, n=3, seed=4, logprobs=20),
        dict(temperature=0.0, stop=["\n", "("], min_tokens=2),
        dict(temperature=0.5, prompt_logprobs=0, stop_token_ids=[7, 8]),
    ]

    def one(i: int) -> None:
        words = " ".join(
            rng.choice(["def", "x", "=", "(", "return", "import", "os"]) for _ in range(rng.randint(1, 600))
        )
        sampling = pb.SamplingParams(max_tokens=rng.randint(1, 12), **options[i % len(options)])
        call = stub.Generate(pb.GenerateRequest(prompt=words, sampling=sampling))
        if i % 7 == 3:
            next(iter(call), None)
            call.cancel()
        else:
            list(call)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(48)))
    samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert metric_value(samples, "jserve:programs_lowered_while_serving_total") == 0
    # 9 step programs (token buckets 8 .. 2048) and structured outputs' deferred sampling (8, 16, 32, 64 rows)
    assert metric_value(samples, "jserve:compiled_programs") == 9 + 4
