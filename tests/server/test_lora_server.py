"""Multi-LoRA through the server (--enable-lora): adapters selected by the OpenAI ``model`` field, gRPC
``lora_name`` and JetStream ``lora_adapter_id``; loaded and unloaded over HTTP while serving; refusals with
their status codes; the adapters in /v1/models and Prometheus; nothing compiled while serving."""

from __future__ import annotations

import grpc
import httpx
import pytest
import torch
import transformers

from jserve import BUNDLED_MODEL
from jserve.server.gen import jetstream_pb2, jetstream_pb2_grpc
from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from tests.lora.adapters import make_adapter
from tests.server.harness import ServerProcess, metric_value, scrape

PROMPT = "def fibonacci(n):\n"
BASE = "tiny-pycoder"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapters of the bundled model: 'sql' (q/v, rank 8), 'docs' (all projections, rank 4), and one of rank 16."""
    root = tmp_path_factory.mktemp("server-lora")
    base = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    return {
        "sql": make_adapter(base, root / "sql", seed=1, rank=8, targets=["q_proj", "v_proj"], scale=0.5)[0],
        "docs": make_adapter(base, root / "docs", seed=2, rank=4, scale=0.5)[0],
        "wide": make_adapter(base, root / "wide", seed=3, rank=16, targets=["q_proj"])[0],
    }


@pytest.fixture(scope="module")
def server(adapters):
    proc = ServerProcess(
        "--http-port", "0", "--metrics-port", "0", "--max-num-seqs", "4", "--max-num-batched-tokens", "64",
        "--max-model-len", "256", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--lora-modules", f"sql={adapters['sql']}",
        precompile=True,  # every program built before ready: adapter loads and swaps must compile nothing
    ).start()  # fmt: skip
    yield proc
    assert proc.stop() == 0


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{server.http_port}{path}", json=body, timeout=60)


def _complete(server, model: str) -> str:
    response = _post(server, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _models(server) -> dict[str, dict]:
    listing = httpx.get(f"http://127.0.0.1:{server.http_port}/v1/models", timeout=10).json()
    return {m["id"]: m for m in listing["data"]}


def test_the_model_field_selects_an_adapter(server, adapters):
    models = _models(server)
    assert models["sql"]["parent"] == BASE and models["sql"]["root"] == str(adapters["sql"])
    base, sql = _complete(server, BASE), _complete(server, "sql")
    assert sql != base  # the adapter changes the greedy text
    assert _complete(server, "sql") == sql and _complete(server, BASE) == base
    error = _post(server, "/v1/completions", {"model": "nope", "prompt": PROMPT}).json()["error"]
    assert error["code"] == 404 and "'nope' does not exist" in error["message"]
    schema = httpx.get(f"http://127.0.0.1:{server.http_port}/openapi.json", timeout=10).json()
    model = schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
    assert "enum" not in model and "adapter" in model["description"]  # adapters come and go while serving


def test_grpc_and_jetstream_select_adapters_by_name(server):
    expected = _complete(server, "sql")
    with server.channel() as channel:
        stub = pb_grpc.GenerationStub(channel)
        sampling = pb.SamplingParams(temperature=0, max_tokens=12)
        text = "".join(
            r.text for r in stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=sampling, lora_name="sql"))
        )
        assert text == expected
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, sampling=sampling, lora_name="nope")))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in info.value.details()
        orchestrator = jetstream_pb2_grpc.OrchestratorStub(channel)
        content = jetstream_pb2.DecodeRequest.TextContent(text=PROMPT)
        request = jetstream_pb2.DecodeRequest(max_tokens=12, text_content=content, lora_adapter_id="sql")
        assert "".join(r.stream_content.samples[0].text for r in orchestrator.Decode(request)) == expected
        with pytest.raises(grpc.RpcError) as info:
            list(
                orchestrator.Decode(
                    jetstream_pb2.DecodeRequest(max_tokens=4, text_content=content, lora_adapter_id="x")
                )
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_load_and_unload_while_serving(server, adapters):
    assert "docs" not in _models(server)
    response = _post(server, "/v1/load_lora_adapter", {"lora_name": "docs", "lora_path": str(adapters["docs"])})
    assert response.status_code == 200, response.text
    assert _models(server)["docs"]["parent"] == BASE
    docs = _complete(server, "docs")
    assert docs not in (_complete(server, BASE), _complete(server, "sql"))
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "docs"}).status_code == 200
    assert "docs" not in _models(server)
    assert _post(server, "/v1/completions", {"model": "docs", "prompt": PROMPT}).status_code == 404
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "docs"}).status_code == 404
    assert _complete(server, "sql")  # the others still serve


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"lora_name": "bad", "lora_path": "/nonexistent"}, "no adapter_config.json"),
        ({"lora_name": "wide", "lora_path": "WIDE"}, "exceeds max_lora_rank=8"),
        ({"lora_name": "sql", "lora_path": "SQL"}, "already loaded"),
        ({"lora_name": BASE, "lora_path": "SQL"}, "base model's name"),
    ],
)
def test_bad_loads_are_400_with_the_reason(server, adapters, body, reason):
    body = {
        **body,
        "lora_path": {"WIDE": str(adapters["wide"]), "SQL": str(adapters["sql"])}.get(
            body["lora_path"], body["lora_path"]
        ),
    }
    response = _post(server, "/v1/load_lora_adapter", body)
    assert response.status_code == 400 and reason in response.json()["error"]["message"]
    assert _complete(server, "sql")


def test_metrics_count_adapters_and_nothing_compiles_while_serving(server):
    _complete(server, "sql")
    samples = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    labels = {"model_name": BASE}
    assert metric_value(samples, "jserve:lora_slots", **labels) == 2
    assert metric_value(samples, "jserve:lora_adapters_resident", **labels) >= 1
    assert metric_value(samples, "jserve:lora_loads_total", **labels) >= 1
    assert metric_value(samples, "jserve:programs_lowered_while_serving_total", **labels) == 0
