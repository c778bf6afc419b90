"""The OpenAI HTTP API against a real server: echo with prompt logprobs and text offsets, the validation rules
both endpoints share (max_tokens, a required model, unsupported fields), the OpenAPI schema, and /metrics on the
HTTP port with vLLM's names and the prompt-token counters' relation."""

from __future__ import annotations

import json

import httpx
import pytest

from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from jserve.server.openai_protocol import NOOP_FIELDS
from tests.server.harness import ServerProcess, metric_value, scrape

MODEL = "tiny-pycoder"
MAX_MODEL_LEN = 128
PROMPT = "def fibonacci(n):\n"
SPECIAL = {"<s>", "</s>", "<unk>"}
CHAT = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess("--http-port", "0", "--metrics-port", "0", "--max-model-len", str(MAX_MODEL_LEN)).start()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.GenerationStub(channel)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{server.http_port}{path}", json=body, timeout=60)


def _complete(server, **body) -> dict:
    response = _post(server, "/v1/completions", {"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _chat(server, **body) -> httpx.Response:
    return _post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, **body})


def _stream(server, **body) -> list[dict]:
    """The SSE chunks of a streamed completion, [DONE] checked and dropped."""
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    with httpx.stream("POST", url, json={"model": MODEL, "stream": True, **body}, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _merge_stream(chunks: list[dict]) -> tuple[str, dict]:
    """One choice's text and logprobs lists, concatenated over the chunks."""
    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        text += choice["text"]
        for key, values in (choice["logprobs"] or {}).items():
            lp[key] += values
    return text, lp


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def _assert_offsets_locate_tokens(text: str, lp: dict) -> None:
    """Each token's text sits at its text_offset in the choice's text; a special token that the text does not show
    takes no room."""
    offsets, tokens = lp["text_offset"], lp["tokens"]
    assert len(offsets) == len(tokens) and offsets[0] == 0
    for i, (token, offset) in enumerate(zip(tokens, offsets, strict=True)):
        if token in SPECIAL:
            assert i + 1 == len(offsets) or offsets[i + 1] == offset, (i, token)
        else:
            assert text[offset : offset + len(token)] == token, (i, token, offset)


def _prompt_ids(stub, text: str, add_special_tokens: bool = True) -> list[int]:
    request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
    return list(stub.Tokenize(request).token_ids)


# ---------------------------------------------------------------------- echo, logprobs, text_offset


def test_echo_returns_the_prompt_and_its_logprobs_then_the_completion(server, stub):
    body = dict(prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    plain = _complete(server, **body)["choices"][0]
    echoed = _complete(server, **body, echo=True)
    (choice,) = echoed["choices"]
    num_prompt = echoed["usage"]["prompt_tokens"]
    assert echoed["usage"]["completion_tokens"] == 6
    assert choice["text"] == PROMPT + plain["text"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == num_prompt + 6 == len(_prompt_ids(stub, PROMPT)) + 6
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first prompt token
    generated = plain["logprobs"]  # the echoed response's generated part is the plain response's
    assert lp["tokens"][num_prompt:] == generated["tokens"]
    assert lp["token_logprobs"][num_prompt:] == pytest.approx(generated["token_logprobs"], abs=1e-5)
    for top, want in zip(lp["top_logprobs"][num_prompt:], generated["top_logprobs"], strict=True):
        assert top == pytest.approx(want, abs=1e-5)
    for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert value <= 0 and 1 <= len(top) <= 2 and max(top.values()) >= value
    # the prompt's logprobs are the engine's prompt_logprobs, as gRPC reports them
    request = pb.GenerateRequest(prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=1, prompt_logprobs=2))
    grpc_prompt = [lp for r in stub.Generate(request, timeout=60) for lp in r.prompt_logprobs]
    assert [p.logprob for p in grpc_prompt[1:]] == pytest.approx(lp["token_logprobs"][1:num_prompt], abs=1e-5)
    _assert_offsets_locate_tokens(choice["text"], lp)
    _assert_offsets_locate_tokens(plain["text"], plain["logprobs"])  # from 0 at the completion without echo


def test_echo_with_zero_max_tokens_scores_token_prompts_only(server, stub):
    prompts = [_prompt_ids(stub, PROMPT, add_special_tokens=False), _prompt_ids(stub, "import os\nimport sys")]
    scored = _complete(server, prompt=prompts, echo=True, max_tokens=0, logprobs=1)
    num_prompt = sum(map(len, prompts))
    assert scored["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 0, "total_tokens": num_prompt}
    one_more = _complete(server, prompt=prompts, echo=True, max_tokens=1, logprobs=1, temperature=0)
    for ids, choice, longer in zip(prompts, scored["choices"], one_more["choices"], strict=True):
        assert choice["finish_reason"] == "length"
        assert choice["text"] == stub.Detokenize(pb.DetokenizeRequest(token_ids=ids)).text
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"] == pytest.approx(longer["logprobs"]["token_logprobs"][:-1], abs=1e-5)
        assert longer["text"].startswith(choice["text"]) and len(longer["logprobs"]["tokens"]) == len(ids) + 1
        _assert_offsets_locate_tokens(choice["text"], lp)
    assert [c["index"] for c in scored["choices"]] == [0, 1]


def test_streamed_echo_sends_the_prompt_first_and_adds_up_to_the_plain_response(server):
    body = dict(prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    for echo in (True, False):
        plain = _complete(server, **body, echo=echo)["choices"][0]
        chunks = _stream(server, **body, echo=echo)
        text, lp = _merge_stream(chunks)
        assert text == plain["text"]
        assert lp["tokens"] == plain["logprobs"]["tokens"] and lp["text_offset"] == plain["logprobs"]["text_offset"]
        assert lp["token_logprobs"][echo:] == pytest.approx(plain["logprobs"]["token_logprobs"][echo:], abs=1e-5)
        if echo:
            first = chunks[0]["choices"][0]
            assert first["text"].startswith(PROMPT) and first["logprobs"]["token_logprobs"][0] is None
    (only,) = _stream(server, prompt=PROMPT, echo=True, max_tokens=0)
    assert (only["choices"][0]["text"], only["choices"][0]["finish_reason"]) == (PROMPT, "length")


# ---------------------------------------------------------------------- validation shared by both endpoints


def test_max_tokens_rules_are_the_same_on_both_endpoints(server):
    for response, field in [
        (_post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 0}), "max_tokens"),
        (_post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": -1}), "max_tokens"),
        (_chat(server, max_tokens=0), "max_tokens"),
        (_chat(server, max_tokens=-1), "max_tokens"),
        (_chat(server, max_completion_tokens=0, max_tokens=5), "max_completion_tokens"),
    ]:
        error = _error(response)
        assert error["param"] == field and error["message"].startswith(f"{field} must be >= 1"), error
    chat = _chat(server, max_completion_tokens=2, max_tokens=9, ignore_eos=True)
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 2
    # null: until the context is full, on both
    done = _complete(server, prompt=PROMPT, max_tokens=None, ignore_eos=True)
    assert done["usage"]["total_tokens"] == MAX_MODEL_LEN and done["choices"][0]["finish_reason"] == "length"
    chat = _chat(server, max_tokens=None, ignore_eos=True).json()
    assert chat["usage"]["total_tokens"] == MAX_MODEL_LEN and chat["choices"][0]["finish_reason"] == "length"


def test_model_is_required_and_must_be_the_served_one(server):
    for path, body in [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": CHAT})]:
        error = _error(_post(server, path, body))
        assert error["param"] == "model" and "model" in error["message"]
        error = _error(_post(server, path, {**body, "model": "gpt-4"}), 404)
        assert error["param"] == "model" and "'gpt-4' does not exist" in error["message"]


def test_unimplemented_fields_are_400_naming_them(server):
    completion = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    error = _error(_post(server, "/v1/completions", {**completion, "guided_jsn": {}, "frobnicate": 1}))
    assert error["message"] == "unsupported field(s): guided_jsn, frobnicate" and error["param"] == "guided_jsn"
    error = _error(_chat(server, tools=[], functions=[], response_format={"type": "json_object"}))
    assert error["message"] == "unsupported field(s): functions"  # OpenAI's deprecated predecessor of tools
    error = _error(_chat(server, response_format={"type": "json_object", "strict": True}))
    assert error["param"] == "response_format.strict"  # nested objects are checked too
    error = _error(_chat(server, echo=True))  # a completions field is not a chat field
    assert error["message"] == "unsupported field(s): echo"
    error = _error(_post(server, "/v1/completions", {**completion, "store": True}))
    assert error["param"] == "store"
    # the documented no-ops are accepted, and the implemented fields still work
    noops = {"user": "u-1", "safety_identifier": "s-1", "metadata": {"k": "v"}, "store": False}
    assert set(noops) == set(NOOP_FIELDS)
    done = _complete(server, prompt=PROMPT, max_tokens=3, n=2, seed=3, stop=["\n\n"], temperature=1.0, **noops)
    assert len(done["choices"]) == 2
    assert _chat(server, max_tokens=2, **noops).status_code == 200


def test_a_bad_value_names_its_field(server):
    error = _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "top_p": 3.0}))
    assert error["param"] == "top_p" and error["message"] == "top_p must be in (0, 1], got 3.0"
    error = _error(_chat(server, top_logprobs=2))
    assert error["param"] == "top_logprobs"


def test_openapi_schema_requires_the_served_model_and_no_other_fields(server):
    schema = httpx.get(f"http://127.0.0.1:{server.http_port}/openapi.json", timeout=10).json()
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        body = schema["components"]["schemas"][name]
        assert "model" in body["required"] and body["properties"]["model"]["enum"] == [MODEL]
        assert body["additionalProperties"] is False
        assert set(NOOP_FIELDS) <= set(body["properties"])
    assert "/metrics" not in schema["paths"]


# ---------------------------------------------------------------------- metrics


def test_metrics_on_the_http_port_with_vllm_names_and_consistent_prompt_counters(server):
    http_url = f"http://127.0.0.1:{server.http_port}/metrics"
    response = httpx.get(http_url, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    before = scrape(http_url)
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    for name in sorted(os.listdir(argv[1])):\n"
    prompt += "        if name.endswith('.py'):\n            print(name, os.path.getsize(name))\n"
    for _ in range(2):  # the second one finds the first's full pages in the prefix cache
        done = _complete(server, prompt=prompt, max_tokens=2, ignore_eos=True)
    num_prompt = done["usage"]["prompt_tokens"]
    assert num_prompt > 32
    after = scrape(http_url)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    cached = (num_prompt - 1) // 16 * 16  # full 16-token pages; the last prompt token is always computed
    assert delta("jserve:prompt_tokens_total") == 2 * num_prompt
    assert delta("jserve:prompt_tokens_cached_total") == cached
    assert delta("jserve:num_preemptions_total") == 0
    assert delta("jserve:prompt_tokens_computed_total") == 2 * num_prompt - cached  # total - cached + recomputed
    assert delta("jserve:generation_tokens_total") == 4
    assert delta("jserve:request_success_total", finished_reason="length") == 2
    assert delta("jserve:requests_total", outcome="length") == 2
    for histogram in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_time_per_output_token_seconds",
        "inter_token_latency_seconds",
    ):
        assert delta(f"jserve:{histogram}_count") == 2, histogram
    assert 0 <= metric_value(after, "jserve:kv_cache_usage_perc") <= 1
    for name in ("jserve:num_requests_running", "jserve:num_requests_waiting", "jserve:kv_cache_pages_cached"):
        assert name in after, name
    jserve = {name: values for name, values in after.items() if name.startswith("jserve:")}
    assert all(labels.get("model_name") == MODEL for values in jserve.values() for labels, _ in values)
    assert not [name for name in after if name.startswith("jserve_")]  # the old names are gone
    # the --metrics-port endpoint serves the same registry
    other = scrape(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert metric_value(other, "jserve:prompt_tokens_total") == metric_value(after, "jserve:prompt_tokens_total")
