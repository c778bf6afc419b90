"""The HTTP server's OpenAPI document, made to tell the truth: what each endpoint returns and which values each
request field accepts.

FastAPI's default document has a 422 this server never sends, no error bodies, empty 200 schemas and no bounds,
so generated clients and API fuzzers (tests/server/test_fuzz.py runs schemathesis with its conformance checks)
would test a contract that is not the real one. ``document`` rewrites it: every status an endpoint can send
with OpenAI's error body, the 200 bodies (JSON, or the server-sent events of ``stream: true``, each event's
``data`` a chunk, an error, or ``[DONE]``), ``model`` narrowed to the served name, and each sampling field's
range as ``SamplingParams`` / ``RequestLimits`` check it (a value outside it is a 400; not every value inside
is accepted: ``min_tokens <= max_tokens`` or a prompt's token count cannot be written in a schema).

The response models only document: the server builds its bodies as dicts (jserve.server.http_server) and the
fuzz test's ``response_schema_conformance`` check holds the two together.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from jserve.limits import PROMPT_CHARS_PER_TOKEN, RequestLimits
from jserve.sampling_params import FLOAT32_MAX, FLOAT32_TINY, INT64_MAX, UINT64_MAX


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error body; ``param`` names the field at fault, where there is one."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One streamed event; the last one (``stream_options.include_usage``) has ``usage`` and no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


ChatFinishReason = Literal["stop", "length", "tool_calls"] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: ChatFinishReason


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's base model (--enable-lora)
    root: str | None = None  # a LoRA adapter's path


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class HealthStatus(BaseModel):
    status: Literal["ok", "not serving"]


_MODELS = (
    ErrorResponse,
    CompletionResponse,
    CompletionChunk,
    ChatCompletionResponse,
    ChatCompletionChunk,
    ModelList,
    HealthStatus,
)

_ERRORS = {
    "400": "a missing, invalid or unsupported field, or a request over the admission limits",
    "401": "--api-key is set and the request lacks it",
    "404": "model is not the served model",
    "413": "the body is larger than --max-message-bytes",
    "429": "--max-queue-size requests are in flight",
    "500": "the engine failed this request",
    "503": "the server is draining, or an engine step has stalled",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _event_stream(chunk: str) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1: the schema of text/event-stream describes each event): its ``data``
    is ``[DONE]`` or the JSON of a chunk, or of an error that ended the stream after it started."""
    payload = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}}
    data = {"type": "string", "if": {"const": "[DONE]"}, "else": payload}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def _responses(ok: dict[str, Any], api_key: bool, errors: tuple[str, ...]) -> dict[str, Any]:
    out = {"200": ok}
    for code in errors:
        if code != "401" or api_key:
            out[code] = _json("ErrorResponse", _ERRORS[code])
    return out


def _generation_ok(response: str, chunk: str) -> dict[str, Any]:
    ok = _json(response, f"a {response}, or with stream: true its chunks as server-sent events")
    ok["content"]["text/event-stream"] = _event_stream(chunk)
    return ok


def document(
    schema: dict[str, Any],
    *,
    model: str,
    vocab_size: int,
    max_model_len: int,
    limits: RequestLimits,
    api_key: bool,
    lora: bool = False,
) -> dict[str, Any]:
    """Rewrites FastAPI's ``schema`` in place (see the module docstring) and returns it. ``lora``: adapters
    loaded while serving are models too, so ``model`` is any name ``/v1/models`` lists."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    components.update(defs["$defs"])
    paths = schema["paths"]
    post_errors = ("400", "401", "404", "413", "429", "500", "503")
    paths["/v1/completions"]["post"]["responses"] = _responses(
        _generation_ok("CompletionResponse", "CompletionChunk"), api_key, post_errors
    )
    paths["/v1/chat/completions"]["post"]["responses"] = _responses(
        _generation_ok("ChatCompletionResponse", "ChatCompletionChunk"), api_key, post_errors
    )
    paths["/v1/models"]["get"]["responses"] = _responses(_json("ModelList", "the served model"), api_key, ("401",))
    health = _json("HealthStatus", "serving")
    paths["/health"]["get"]["responses"] = {"200": health, "503": {**health, "description": "draining or stalled"}}
    if api_key:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in paths.items():
            if path != "/health":
                for operation in item.values():
                    operation["security"] = [{"bearer": []}]
    bounds = _bounds(vocab_size=vocab_size, max_model_len=max_model_len, limits=limits)
    for name, extra in (("CompletionRequest", _completion_only), ("ChatCompletionRequest", _chat_only)):
        body = components[name]
        body["properties"]["model"] = {"type": "string", "enum": [model], "title": "Model"}
        if lora:
            body["properties"]["model"] = {
                "type": "string",
                "title": "Model",
                "description": f"{model!r} or a loaded LoRA adapter's name (GET /v1/models)",
            }
        required = body.setdefault("required", [])
        if "model" not in required:
            required.insert(0, "model")
        for field, constraints in {**bounds, **extra(vocab_size, max_model_len, limits)}.items():
            if field in body["properties"]:
                _constrain(body["properties"][field], constraints)
    components["CompletionRequest"]["properties"]["prompt"] = _prompt(vocab_size, max_model_len, limits)
    return schema


def _bounds(*, vocab_size: int, max_model_len: int, limits: RequestLimits) -> dict[str, dict[str, Any]]:
    """The ranges both endpoints check (SamplingParams.validate, RequestLimits.check_sampling)."""
    stop_string = {"type": "string", "minLength": 1, "maxLength": limits.max_stop_string_chars}
    return {
        "n": {"integer": {"minimum": 1, "maximum": limits.max_n}},
        "temperature": {"number": {"minimum": 0, "maximum": FLOAT32_MAX}},
        "top_p": {"number": {"exclusiveMinimum": 0, "maximum": 1}},
        "top_k": {"integer": {"minimum": -1, "maximum": INT64_MAX}},
        "min_p": {"number": {"minimum": 0, "maximum": 1}},
        "repetition_penalty": {"number": {"minimum": FLOAT32_TINY, "maximum": FLOAT32_MAX}},
        "presence_penalty": {"number": {"minimum": -2, "maximum": 2}},
        "frequency_penalty": {"number": {"minimum": -2, "maximum": 2}},
        "seed": {"integer": {"minimum": 0, "maximum": UINT64_MAX}},
        "min_tokens": {"integer": {"minimum": 0, "maximum": INT64_MAX}},
        "stop": {
            "string": {"maxLength": limits.max_stop_string_chars},  # "" means no stop string
            "array": {"maxItems": limits.max_stop_strings, "items": stop_string},
        },
        "stop_token_ids": {
            "array": {
                "maxItems": limits.max_stop_token_ids,
                "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1},
            }
        },
        "logit_bias": {"object": {"maxProperties": 0}},  # only empty or null
        "store": {"boolean": {"const": False}},  # only false or null
    }


def _prompt(vocab_size: int, max_model_len: int, limits: RequestLimits) -> dict[str, Any]:
    """A string, a list of strings, a list of token ids or a list of token-id lists (none of them empty), each
    no longer than max_model_len allows (limits.check_token_count and check_prompt_chars)."""
    text = {"type": "string", "minLength": 1, "maxLength": PROMPT_CHARS_PER_TOKEN * max_model_len}
    ids = {
        "type": "array",
        "minItems": 1,
        "maxItems": max_model_len - 1,
        "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1},
    }
    prompts = limits.max_prompts_per_request
    lists = [{"type": "array", "minItems": 1, "maxItems": prompts, "items": one} for one in (text, ids)]
    return {"title": "Prompt", "anyOf": [text, lists[0], ids, lists[1]]}


def _completion_only(vocab_size: int, max_model_len: int, limits: RequestLimits) -> dict[str, dict[str, Any]]:
    return {
        "max_tokens": {"integer": {"minimum": 0, "maximum": INT64_MAX}},  # 0 only with echo
        "logprobs": {"integer": {"minimum": 0, "maximum": limits.max_logprobs}},
        "suffix": {"string": {"maxLength": 0}},  # only empty or null
    }


def _chat_only(vocab_size: int, max_model_len: int, limits: RequestLimits) -> dict[str, dict[str, Any]]:
    return {
        "messages": {"array": {"maxItems": limits.max_chat_messages}},
        "max_tokens": {"integer": {"minimum": 1, "maximum": INT64_MAX}},
        "max_completion_tokens": {"integer": {"minimum": 1, "maximum": INT64_MAX}},
        "top_logprobs": {"integer": {"minimum": 0, "maximum": limits.max_logprobs}},
    }


def _constrain(prop: dict[str, Any], constraints: dict[str, dict[str, Any]]) -> None:
    """Adds ``constraints[type]`` to the branch of ``prop`` (itself, or one of its ``anyOf``) of that JSON type."""
    for branch in prop.get("anyOf", [prop]):
        extra = constraints.get(branch.get("type", ""))
        if extra is not None:
            branch.update(extra)
