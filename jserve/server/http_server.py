"""OpenAI-compatible HTTP front end (FastAPI on uvicorn): /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics (the Prometheus registry, as on ``--metrics-port``). The user-facing reference is docs/api.md.

It runs on the same asyncio loop as the gRPC server and goes through the same ServingCore, so admission,
draining, metrics and abort-on-disconnect behave alike (a client that drops an SSE stream cancels the
response task, which closes the request's generator and aborts it). Errors use OpenAI's ``{"error": ...}``
body so the ``openai`` client raises its usual exception types.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jserve.limits import check_prompt_chars
from jserve.lora.registry import AdapterNotFoundError
from jserve.lora.request import LoRARequest
from jserve.outputs import CompletionOutput, RequestOutput
from jserve.sampling_params import SamplingParams, StructuredOutputsParams
from jserve.server.auth import key_from_headers, key_matches
from jserve.server.body_limit import BodySizeLimit
from jserve.server.core import EngineError, QueueFullError, ServingCore, Unavailable
from jserve.server.lora_routes import adapter_models, add_lora_routes
from jserve.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    finish_reason,
    logprob,
)
from jserve.server.openai_schema import document
from jserve.server.tool_calls import (
    ToolChoice,
    ToolStream,
    assistant_message,
    chat_finish_reason,
    extract_tool_calls,
    get_tool_parser,
    new_tool_stream,
)

_ERRORS: list[tuple[type[BaseException], int, str]] = [
    (ValueError, 400, "invalid_request_error"),
    (QueueFullError, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable"),
    (EngineError, 500, "internal_error"),
]


_LEADING_FIELD = re.compile(r"^([a-z_][a-z0-9_]*)(?::| must | is | requires )")
"""ValueErrors start with the field they are about ("top_p must be in (0, 1]", "n: got 9; ..."): the ``param``."""


def _error_response(exc: BaseException, core: ServingCore) -> JSONResponse:
    param = None
    if isinstance(exc, ValueError):
        core.metrics.record_outcome("invalid")  # the other kinds are counted by ServingCore
        if m := _LEADING_FIELD.match(str(exc)):
            param = m.group(1)
    for kind, status, name in _ERRORS:
        if isinstance(exc, kind):
            return JSONResponse(error_body(str(exc), name, status, param), status_code=status)
    raise exc


class _Job:
    """One prompt of a request: its ids, where its samples go among the response's choices, and for ``echo`` the
    prompt as shown (a text prompt as sent, token ids decoded) plus its prompt logprobs once they come."""

    def __init__(self, text: str | None, ids: list[int], first_choice: int, shown: str = ""):
        self.text, self.ids, self.first_choice, self.shown = text, ids, first_choice, shown
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.held: list[RequestOutput] = []  # deltas waiting for prompt_logprobs (see _Formatter._ready)

    @property
    def from_text(self) -> bool:
        return self.text is not None


async def _merged(
    core: ServingCore,
    jobs: Sequence[_Job],
    params: SamplingParams,
    request_id: str,
    lora_request: LoRARequest | None = None,
) -> AsyncIterator[tuple[_Job, RequestOutput]]:
    """Runs every prompt concurrently and yields (job, delta) as they come; closing it aborts them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: _Job) -> None:
        stream = core.generate(
            job.ids, params, request_id=f"{request_id}-{i}", prompt=job.text, lora_request=lora_request
        )
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    await queue.put((job, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put(exc)
            return
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIApp:
    """Builds the FastAPI app over a ServingCore."""

    def __init__(self, core: ServingCore, api_key: str | None = None, tool_call_parser: str | None = None):
        if tool_call_parser is not None:
            get_tool_parser(tool_call_parser)  # an unknown name fails at startup, listing the known ones
        self.core = core
        self.api_key = api_key
        self.tool_call_parser = tool_call_parser
        self.app = FastAPI(title="jserve", docs_url=None, redoc_url=None)
        self.app.add_exception_handler(RequestValidationError, self._validation_error)
        self.app.add_exception_handler(HTTPException, _http_error)
        self.app.get("/health")(self.health)
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/chat/completions")(self.chat_completions)
        self.app.get("/metrics", include_in_schema=False)(self.metrics)
        if core.adapters is not None:
            add_lora_routes(self.app, core.adapters)
        self.app.openapi = self._openapi

    def _openapi(self) -> dict:
        """FastAPI's schema rewritten to the real contract (jserve.server.openai_schema): every status each
        endpoint sends and its body, ``model`` narrowed to the served name, each field's accepted range."""
        if self.app.openapi_schema is None:
            card = self.core.card
            self.app.openapi_schema = document(
                get_openapi(title=self.app.title, version=self.app.version, routes=self.app.routes),
                model=card.name,
                vocab_size=card.vocab_size,
                max_model_len=card.max_model_len,
                limits=self.core.limits,
                api_key=bool(self.api_key),
                lora=self.core.adapters is not None,
            )
        return self.app.openapi_schema

    async def __call__(self, scope, receive, send) -> None:
        """The ASGI app: the API-key check, then FastAPI. A plain ASGI wrapper rather than FastAPI middleware:
        Starlette's ``BaseHTTPMiddleware`` wraps ``receive`` and would hide a client's disconnect from the
        endpoints (which abort the request when it comes)."""
        if self.api_key and scope["type"] == "http" and scope["path"] != "/health":
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
            if not key_matches(self.api_key, key_from_headers(headers)):
                body = error_body("missing or invalid API key", "authentication_error", 401)
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _validation_error(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        """400 naming the field: every field the body has but the API does not implement, else the first error."""
        self.core.metrics.record_outcome("invalid")
        errors = exc.errors()
        unsupported = [_field(e) for e in errors if e.get("type") == "extra_forbidden"]
        if unsupported:
            message = f"unsupported field(s): {', '.join(unsupported)}"
            return JSONResponse(error_body(message, "invalid_request_error", 400, unsupported[0]), 400)
        first = errors[0] if errors else {}
        # NOTE: not str(exc): FastAPI's text quotes the endpoint's source file and line
        field = "" if first.get("type") == "json_invalid" else _field(first)  # its loc is a character offset
        message = f"{field or 'body'}: {first.get('msg', 'invalid request body')}"
        return JSONResponse(error_body(message, "invalid_request_error", 400, field or None), 400)

    # ------------------------------------------------------------------ endpoints

    async def health(self) -> JSONResponse:
        return JSONResponse(
            {"status": "ok" if self.core.serving else "not serving"}, status_code=200 if self.core.serving else 503
        )

    async def models(self) -> dict:
        card = self.core.card
        return {
            "object": "list",
            "data": [
                {
                    "id": card.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "jserve",
                    "max_model_len": card.max_model_len,
                },
                *adapter_models(self.core.adapters, card.max_model_len),
            ],
        }

    async def metrics(self) -> Response:
        """Prometheus metrics on the API port too, as vLLM serves them (``--metrics-port`` serves the same)."""
        body, content_type = self.core.metrics.render()
        return Response(body, media_type=content_type)

    def _check_model(self, model: str) -> JSONResponse | LoRARequest | None:
        """None for the base model, the adapter a ``model`` names (``--enable-lora``), else a 404 response."""
        if model == self.core.card.name:
            return None
        if self.core.adapters is not None:
            try:
                return self.core.adapters.get(model)
            except AdapterNotFoundError:
                pass
        return JSONResponse(
            error_body(
                f"model {model!r} does not exist; this server serves {self.core.card.name!r}"
                + (" and the adapters of /v1/models" if self.core.adapters is not None else ""),
                "not_found_error",
                404,
                "model",
            ),
            404,
        )

    async def completions(self, body: CompletionRequest, request: Request):
        if isinstance(lora := self._check_model(body.model), JSONResponse):
            return lora
        try:
            self.core.check_accepting()
            prompts = body.prompts()
            self.core.limits.check_num_prompts(len(prompts))
            encoded = [self._encode(prompt) for prompt in prompts]
            params = body.sampling_params(room=self.core.card.max_model_len - max(len(ids) for _, ids in encoded))
            jobs = []
            for i, (text, ids) in enumerate(encoded):
                self.core.validate(ids, params)
                jobs.append(_Job(text, ids, i * params.n, self._shown(text, ids, params) if body.echo else ""))
        except (ValueError, Unavailable, EngineError) as e:
            return _error_response(e, self.core)
        return await self._respond(request, body, jobs, params, chat=False, lora=lora)

    def _encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        as_text = isinstance(prompt, str)
        return self.core.encode_prompt(prompt if as_text else None, None if as_text else prompt)

    def _shown(self, text: str | None, ids: list[int], params: SamplingParams) -> str:
        """The prompt as ``echo`` returns it: a text prompt as sent; token ids decoded."""
        if text is not None:
            return text
        tok = self.core.tokenizer
        return tok.decode(ids, skip_special_tokens=params.skip_special_tokens) if tok is not None else ""

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        if isinstance(lora := self._check_model(body.model), JSONResponse):
            return lora
        try:
            self.core.check_accepting()
            if self.core.tokenizer is None:
                raise ValueError("messages: this model has no tokenizer")
            self.core.limits.check_num_messages(len(body.messages))
            messages = [m.for_template() for m in body.messages]
            calls = [m.tool_calls for m in body.messages if m.tool_calls]
            chars = "".join(m["content"] or "" for m in messages) + (json.dumps(calls) if calls else "")
            check_prompt_chars("messages", chars, self.core.card.max_model_len)
            tools = self._tool_choice(body)
            ids = self.core.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                chat_template=body.chat_template,
                tools=list(tools.tools) if tools.mode != "none" else None,
            )
            forced = StructuredOutputsParams(json=tools.json_schema()) if tools.constrained else None
            params = body.sampling_params(max(1, self.core.card.max_model_len - len(ids)), forced)
            if tools.mode == "auto" and get_tool_parser(self.tool_call_parser).needs_special_tokens:
                params = dataclasses.replace(params, skip_special_tokens=False)  # its tags may be special tokens
            if (body.top_logprobs or 0) > self.core.limits.max_logprobs:  # checked as "logprobs" below
                limit = self.core.limits.max_logprobs
                raise ValueError(f"top_logprobs: got {body.top_logprobs}; at most {limit} allowed (max_logprobs)")
            self.core.validate(ids, params)
        except (ValueError, Unavailable, EngineError) as e:
            return _error_response(e, self.core)
        return await self._respond(request, body, [_Job(None, ids, 0)], params, chat=True, tools=tools, lora=lora)

    def _tool_choice(self, body: ChatCompletionRequest) -> ToolChoice:
        """The request's tool choice; "auto" needs the server's --tool-call-parser (vLLM's rule), and
        ``parallel_tool_calls: false`` allows one call."""
        tools = body.tool_choice_resolved()
        if tools.mode == "auto" and self.tool_call_parser is None:
            raise ValueError(
                "tool_choice: 'auto' (the default when tools are given) needs the server started with "
                "--tool-call-parser; send tool_choice 'required', 'none' or a named function"
            )
        if body.parallel_tool_calls is False:
            if tools.mode == "auto":
                raise ValueError(
                    "parallel_tool_calls: false is honoured with tool_choice 'required' (one call) or a named "
                    "function; with 'auto' the model's own format decides"
                )
            tools = dataclasses.replace(tools, single_call=True)
        return tools

    # ------------------------------------------------------------------ responses

    async def _respond(
        self,
        request: Request,
        body,
        jobs: list[_Job],
        params: SamplingParams,
        *,
        chat: bool,
        tools: ToolChoice | None = None,
        lora: LoRARequest | None = None,
    ):
        """Runs the jobs; a client that disconnects before the response is complete aborts them (queued ones
        too): the work races a watcher of the connection, and losing the race closes the request stream."""
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        formatter = _Formatter(
            self.core,
            body.model,
            request_id,
            created,
            chat,
            prompt_tokens=sum(len(j.ids) for j in jobs),
            params=params,
            echo=not chat and body.echo,
            echo_only=not chat and body.echo_only,
            tools=tools if tools is not None and tools.mode != "none" else None,
            tool_call_parser=self.tool_call_parser,
        )
        stream = _merged(self.core, jobs, params, request_id, lora)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            # Fail before the 200 goes out when the request is refused at once (e.g. queue full).
            first = await _unless_disconnected(request, _first_or_error(stream))
            if first is _DISCONNECTED:
                await stream.aclose()
                return Response(status_code=499)  # nobody reads it
            if isinstance(first, BaseException):
                return _error_response(first, self.core)
            # from here StreamingResponse watches the connection itself and cancels the body on disconnect
            return StreamingResponse(formatter.sse(first, stream, include_usage), media_type="text/event-stream")

        async def collect() -> JSONResponse | dict:
            try:
                async with contextlib.aclosing(stream):
                    async for job, out in stream:
                        formatter.add(job, out)
            except (ValueError, QueueFullError, Unavailable, EngineError) as e:
                return _error_response(e, self.core)
            return formatter.final()

        result = await _unless_disconnected(request, collect())
        return Response(status_code=499) if result is _DISCONNECTED else result


_DISCONNECTED = object()

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (a body that is not UTF-8, an unknown path, a wrong method) in OpenAI's error
    body too, so that every error a client can get has the one shape; headers (405's Allow) are kept."""
    kind = _ERROR_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_error")
    return JSONResponse(error_body(str(exc.detail), kind, exc.status_code), exc.status_code, headers=exc.headers)


def _field(error: dict) -> str:
    """A pydantic error's field path, without FastAPI's leading "body"."""
    return ".".join(str(p) for p in error.get("loc", ()) if p != "body")


async def _unless_disconnected(request: Request, work: Awaitable):
    """``work``'s result, or ``_DISCONNECTED`` (with ``work`` cancelled) if the client hangs up first.

    The body has been read by now, so the next ASGI message is ``http.disconnect``."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result() if not task.cancelled() else _DISCONNECTED


async def _first_or_error(stream: AsyncIterator) -> tuple | BaseException | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        return None
    except (ValueError, QueueFullError, Unavailable, EngineError) as e:
        await stream.aclose()
        return e


@dataclass
class _Choice:
    """One choice being built: what was sent (or collected) so far, and where the next token's text starts."""

    text: str = ""
    logprobs: dict | None = None
    finish_reason: str | None = None
    offset: int = 0  # text_offset of the next token
    started: bool = False  # the echoed prompt (completions) or the role (chat) went out


class _Formatter:
    """Accumulates deltas into OpenAI completion / chat.completion objects, or formats them as SSE chunks.

    Completions logprobs carry ``text_offset``: each token's character offset in the choice's text (from the
    echoed prompt's start with ``echo``, else from the completion's start), the running sum of the token strings'
    lengths as vLLM computes it; a special token that the text does not show (skipped, or added to a text
    prompt by the tokenizer) counts zero. Streamed offsets continue across chunks."""

    def __init__(
        self,
        core: ServingCore,
        model: str,
        request_id: str,
        created: int,
        chat: bool,
        *,
        prompt_tokens: int,
        params: SamplingParams,
        echo: bool = False,
        echo_only: bool = False,
        tools: ToolChoice | None = None,
        tool_call_parser: str | None = None,
    ):
        self.core, self.model, self.id, self.created, self.chat = core, model, request_id, created, chat
        # chat with tools: the text becomes content and tool_calls (forced calls, or the parser's reading)
        self.tools, self.tool_call_parser = tools, tool_call_parser
        self._tool_streams: dict[int, ToolStream | None] = {}
        self.logprobs = params.logprobs  # None: no logprobs; k: the k best alternatives per token
        self.skip_special_tokens = params.skip_special_tokens
        self.echo, self.echo_only = echo, echo_only
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.choices: dict[int, _Choice] = {}
        tok = core.tokenizer
        self._special = tok.all_special_ids if tok is not None else frozenset()

    def _token(self, token_id: int) -> str:
        tok = self.core.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)

    def _top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        """The k best of an entry (which holds the top-k alternatives plus the actual token)."""
        return sorted(entry.items(), key=lambda kv: -kv[1])[: self.logprobs or 0]

    def _completion_logprobs(
        self, token_ids: Sequence[int], entries: Sequence[dict[int, float] | None], offset: int, hide_special: bool
    ) -> tuple[dict, int]:
        """Completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"} for these tokens, offsets
        counted from ``offset``; also the offset after them. A None entry (the first prompt token) stays None."""
        lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries, strict=True):
            text = self._token(token_id)
            lp["tokens"].append(text)
            lp["text_offset"].append(offset)
            if entry is None:
                lp["token_logprobs"].append(None)
                lp["top_logprobs"].append(None)
            else:
                lp["token_logprobs"].append(logprob(entry.get(token_id, 0.0)))
                lp["top_logprobs"].append({self._token(i): logprob(v) for i, v in self._top(entry)})
            if not (hide_special and token_id in self._special):
                offset += len(text)
        return lp, offset

    def _chat_logprobs(self, token_ids: Sequence[int], entries: Sequence[dict[int, float]]) -> dict:
        def item(token_id: int, value: float) -> dict:
            text = self._token(token_id)
            return {"token": text, "logprob": logprob(value), "bytes": list(text.encode())}

        return {
            "content": [
                {**item(t, e.get(t, 0.0)), "top_logprobs": [item(i, v) for i, v in self._top(e)]}
                for t, e in zip(token_ids, entries, strict=True)
            ]
        }

    def _echo(self, job: _Job) -> tuple[str, dict | None, int]:
        """The echoed prompt: its text, its logprobs (when asked for) and the offset after it."""
        if self.logprobs is None:
            return job.shown, None, 0
        entries = job.prompt_logprobs or [None] * len(job.ids)  # None: aborted before its prefill ended
        lp, offset = self._completion_logprobs(
            job.ids, entries, 0, hide_special=job.from_text or self.skip_special_tokens
        )
        return job.shown, lp, offset

    def _piece(self, job: _Job, choice: _Choice, c: CompletionOutput) -> tuple[str, dict | None]:
        """The text and logprobs this delta adds to its choice (the echoed prompt first, on the first one)."""
        token_ids, entries, text = c.token_ids, c.logprobs or [], c.text
        if self.echo_only:  # the one token the engine ran is not part of the answer
            token_ids, entries, text = [], [], ""
        self.completion_tokens += len(token_ids)
        prefix, lp = "", None
        if self.echo and not choice.started:
            prefix, lp, choice.offset = self._echo(job)
            choice.started = True
        if self.logprobs is not None:
            if self.chat:
                new = self._chat_logprobs(token_ids, entries)
            else:
                new, choice.offset = self._completion_logprobs(
                    token_ids, entries, choice.offset, hide_special=self.skip_special_tokens
                )
            lp = new if lp is None else {k: v + new[k] for k, v in lp.items()}
        return prefix + text, lp

    def _finish(self, c: CompletionOutput) -> str | None:
        if c.finish_reason is None:
            return None
        return "length" if self.echo_only else finish_reason(c.finish_reason)

    def _ready(self, job: _Job, out: RequestOutput) -> list[RequestOutput]:
        """The deltas that can be formatted now: with echo and logprobs, a job's deltas wait for its prompt
        logprobs (they come with its first token, or not at all if it ends before its prefill does)."""
        if out.prompt_logprobs is not None:
            job.prompt_logprobs = out.prompt_logprobs
        if self.echo and self.logprobs is not None and job.prompt_logprobs is None and not out.finished:
            job.held.append(out)
            return []
        ready, job.held = [*job.held, out], []
        return ready

    def _usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def add(self, job: _Job, out: RequestOutput) -> None:
        for delta in self._ready(job, out):
            for c in delta.outputs:
                choice = self.choices.setdefault(job.first_choice + c.index, _Choice())
                text, lp = self._piece(job, choice, c)
                choice.text += text
                if lp is not None:
                    choice.logprobs = (
                        lp if choice.logprobs is None else {k: v + lp[k] for k, v in choice.logprobs.items()}
                    )
                choice.finish_reason = self._finish(c) or choice.finish_reason

    def final(self) -> dict:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            reason = c.finish_reason
            if self.chat and self.tools is not None:
                content, calls = extract_tool_calls(self.tools, self.tool_call_parser, c.text)
                body = {"message": {"role": "assistant", **assistant_message(content, calls)}}
                reason = chat_finish_reason(self.tools, reason, calls)
            elif self.chat:
                body = {"message": {"role": "assistant", "content": c.text}}
            else:
                body = {"text": c.text}
            choices.append({"index": index, **body, "logprobs": c.logprobs, "finish_reason": reason})
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self._usage(),
        }

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def _chunks(self, job: _Job, out: RequestOutput) -> list[str]:
        chunks = []
        for delta in self._ready(job, out):
            for c in delta.outputs:
                index = job.first_choice + c.index
                choice = self.choices.setdefault(index, _Choice())
                first = not choice.started
                text, lp = self._piece(job, choice, c)
                reason = self._finish(c)
                if not (text or reason or c.token_ids or (first and self.echo)):
                    continue
                if self.chat and self.tools is not None:
                    chunks.extend(self._tool_chunks(index, first, text, lp, reason))
                    choice.started = True
                    continue
                if self.chat:
                    delta_body: dict = {"role": "assistant", "content": text} if first else {}
                    if text:
                        delta_body["content"] = text
                    body = {"index": index, "delta": delta_body}
                    choice.started = True
                else:
                    body = {"index": index, "text": text}
                body.update(logprobs=lp, finish_reason=reason)
                chunks.append(self._chunk([body]))
        return chunks

    def _tool_chunks(self, index: int, first: bool, text: str, lp: dict | None, reason: str | None) -> list[str]:
        """A chat delta with tools: the tool stream turns the text into content and tool-call deltas (a call's
        header, then its arguments), one chunk each; the finish reason comes last (tool_calls if any)."""
        stream = self._tool_streams.get(index)
        if index not in self._tool_streams:
            stream = self._tool_streams[index] = new_tool_stream(self.tools, self.tool_call_parser)
        deltas = stream.feed(text) if stream is not None else ([{"content": text}] if text else [])
        if reason is not None and stream is not None:
            deltas += stream.finish()
        if first:
            deltas = [{"role": "assistant", **(deltas[0] if deltas else {"content": ""})}, *deltas[1:]]
        bodies = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if lp is not None:  # the token logprobs ride on the first chunk of this delta
            if not bodies:
                bodies = [{"index": index, "delta": {}, "logprobs": None, "finish_reason": None}]
            bodies[0]["logprobs"] = lp
        if reason is not None:
            calls = stream.tool_calls if stream is not None else []
            bodies.append(
                {
                    "index": index,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": chat_finish_reason(self.tools, reason, calls),
                }
            )
        return [self._chunk([b]) for b in bodies]

    async def sse(self, first: tuple | None, stream: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
        async with contextlib.aclosing(stream):
            try:
                if first is not None:
                    for chunk in self._chunks(*first):
                        yield chunk
                async for job, out in stream:
                    for chunk in self._chunks(job, out):
                        yield chunk
            except (ValueError, QueueFullError, Unavailable, EngineError) as e:
                yield f"data: {json.dumps(error_body(str(e), 'internal_error', 500))}\n\n"
                return
        if include_usage:
            yield self._chunk([], self._usage())
        yield "data: [DONE]\n\n"


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: launch.py owns SIGTERM/SIGINT and the drain."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """Runs the OpenAI app with uvicorn on an already-bound socket (so port 0 works and is known up front)."""

    def __init__(
        self,
        core: ServingCore,
        host: str,
        port: int,
        *,
        api_key: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_body_bytes: int = 16 << 20,
        tool_call_parser: str | None = None,
    ):
        app = OpenAIApp(core, api_key, tool_call_parser)
        self.socket = socket.create_server((host, port))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            BodySizeLimit(app, max_body_bytes),
            log_level="warning",
            lifespan="off",
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            timeout_graceful_shutdown=1,
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self.socket]))

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
