"""OpenAI-compatible HTTP front end (FastAPI on uvicorn): /v1/completions, /v1/chat/completions, /v1/models.

It runs on the same asyncio loop as the gRPC server and goes through the same ServingCore, so admission,
draining, metrics and abort-on-disconnect behave alike (a client that drops an SSE stream cancels the
response task, which closes the request's generator and aborts it). Errors use OpenAI's ``{"error": ...}``
body so the ``openai`` client raises its usual exception types.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jserve.limits import check_prompt_chars
from jserve.outputs import CompletionOutput, RequestOutput
from jserve.sampling_params import SamplingParams
from jserve.server.auth import key_from_headers, key_matches
from jserve.server.body_limit import BodySizeLimit
from jserve.server.core import EngineDeadError, QueueFullError, ServingCore, Unavailable
from jserve.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    finish_reason,
)

_ERRORS: list[tuple[type[BaseException], int, str]] = [
    (ValueError, 400, "invalid_request_error"),
    (QueueFullError, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable"),
    (EngineDeadError, 500, "internal_error"),
]


def _error_response(exc: BaseException, core: ServingCore) -> JSONResponse:
    if isinstance(exc, ValueError):
        core.metrics.record_outcome("invalid")  # the other kinds are counted by ServingCore
    for kind, status, name in _ERRORS:
        if isinstance(exc, kind):
            return JSONResponse(error_body(str(exc), name, status), status_code=status)
    raise exc


class _Job:
    """One prompt of a request: its ids and where its samples go among the response's choices."""

    def __init__(self, text: str | None, ids: list[int], first_choice: int):
        self.text, self.ids, self.first_choice = text, ids, first_choice


async def _merged(
    core: ServingCore, jobs: Sequence[_Job], params: SamplingParams, request_id: str
) -> AsyncIterator[tuple[_Job, RequestOutput]]:
    """Runs every prompt concurrently and yields (job, delta) as they come; closing it aborts them all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: _Job) -> None:
        stream = core.generate(job.ids, params, request_id=f"{request_id}-{i}", prompt=job.text)
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

    def __init__(self, core: ServingCore, api_key: str | None = None):
        self.core = core
        self.api_key = api_key
        self.app = FastAPI(title="jserve", docs_url=None, redoc_url=None)
        self.app.add_exception_handler(RequestValidationError, self._validation_error)
        self.app.get("/health")(self.health)
        self.app.get("/v1/models")(self.models)
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/chat/completions")(self.chat_completions)
        self.app.openapi = self._openapi

    def _openapi(self) -> dict:
        """FastAPI's schema, with ``model`` narrowed to the one name this server serves (any other is a 404),
        so that generated clients and API fuzzers see the real contract."""
        if self.app.openapi_schema is None:
            schema = get_openapi(title=self.app.title, version=self.app.version, routes=self.app.routes)
            model = {"anyOf": [{"type": "string", "enum": [self.core.card.name]}, {"type": "null"}], "title": "Model"}
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                schema["components"]["schemas"][name]["properties"]["model"] = model
            self.app.openapi_schema = schema
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
        self.core.metrics.record_outcome("invalid")
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{field}: {first.get('msg', 'invalid')}" if field else str(exc)
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
                }
            ],
        }

    def _check_model(self, model: str | None) -> JSONResponse | None:
        if model and model != self.core.card.name:
            return JSONResponse(
                error_body(
                    f"model {model!r} does not exist; this server serves {self.core.card.name!r}",
                    "not_found_error",
                    404,
                    "model",
                ),
                404,
            )
        return None

    async def completions(self, body: CompletionRequest, request: Request):
        if (missing := self._check_model(body.model)) is not None:
            return missing
        try:
            self.core.check_accepting()
            params = body.sampling_params()
            prompts = body.prompts()
            self.core.limits.check_num_prompts(len(prompts))
            jobs = []
            for i, prompt in enumerate(prompts):
                as_text = isinstance(prompt, str)
                text, ids = self.core.encode_prompt(prompt if as_text else None, None if as_text else prompt)
                self.core.validate(ids, params)
                jobs.append(_Job(text, ids, i * params.n))
        except (ValueError, Unavailable, EngineDeadError) as e:
            return _error_response(e, self.core)
        return await self._respond(request, body, jobs, params, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        if (missing := self._check_model(body.model)) is not None:
            return missing
        try:
            self.core.check_accepting()
            if self.core.tokenizer is None:
                raise ValueError("messages: this model has no tokenizer")
            self.core.limits.check_num_messages(len(body.messages))
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            check_prompt_chars("messages", "".join(m["content"] for m in messages), self.core.card.max_model_len)
            ids = self.core.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, chat_template=body.chat_template
            )
            room = self.core.card.max_model_len - len(ids) - 1
            params = body.sampling_params(default_max_tokens=max(1, room))
            self.core.validate(ids, params)
        except (ValueError, Unavailable, EngineDeadError) as e:
            return _error_response(e, self.core)
        return await self._respond(request, body, [_Job(None, ids, 0)], params, chat=True)

    # ------------------------------------------------------------------ responses

    async def _respond(self, request: Request, body, jobs: list[_Job], params: SamplingParams, *, chat: bool):
        """Runs the jobs; a client that disconnects before the response is complete aborts them (queued ones
        too): the work races a watcher of the connection, and losing the race closes the request stream."""
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        formatter = _Formatter(
            self.core,
            body.model or self.core.card.name,
            request_id,
            created,
            chat,
            prompt_tokens=sum(len(j.ids) for j in jobs),
            num_top=params.logprobs or 0,
        )
        stream = _merged(self.core, jobs, params, request_id)
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
            except (ValueError, QueueFullError, Unavailable, EngineDeadError) as e:
                return _error_response(e, self.core)
            return formatter.final()

        result = await _unless_disconnected(request, collect())
        return Response(status_code=499) if result is _DISCONNECTED else result


_DISCONNECTED = object()


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
    except (ValueError, QueueFullError, Unavailable, EngineDeadError) as e:
        await stream.aclose()
        return e


class _Formatter:
    """Accumulates deltas into OpenAI completion / chat.completion objects, or formats them as SSE chunks."""

    def __init__(
        self,
        core: ServingCore,
        model: str,
        request_id: str,
        created: int,
        chat: bool,
        *,
        prompt_tokens: int,
        num_top: int,
    ):
        self.core, self.model, self.id, self.created, self.chat = core, model, request_id, created, chat
        self.num_top = num_top
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.choices: dict[int, dict] = {}
        self._role_sent: set[int] = set()

    def _token(self, token_id: int) -> str:
        tok = self.core.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)

    def _logprobs(self, c: CompletionOutput) -> dict | None:
        """OpenAI's shapes: chat {"content": [...]}, completions {"tokens", "token_logprobs", "top_logprobs"}.
        An entry holds the top-k alternatives plus the sampled token; "top" lists only the k best."""
        if c.logprobs is None:
            return None
        pairs = [
            (t, e, sorted(e.items(), key=lambda kv: -kv[1])[: self.num_top])
            for t, e in zip(c.token_ids, c.logprobs, strict=False)
        ]
        if self.chat:

            def item(token_id: int, logprob: float) -> dict:
                text = self._token(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {
                "content": [
                    {**item(t, e.get(t, 0.0)), "top_logprobs": [item(i, lp) for i, lp in top]} for t, e, top in pairs
                ]
            }
        return {
            "tokens": [self._token(t) for t, _, _ in pairs],
            "token_logprobs": [e.get(t, 0.0) for t, e, _ in pairs],
            "top_logprobs": [{self._token(i): lp for i, lp in top} for _, _, top in pairs],
            "text_offset": [],
        }

    def _usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def add(self, job: _Job, out: RequestOutput) -> None:
        for c in out.outputs:
            index = job.first_choice + c.index
            choice = self.choices.setdefault(
                index, {"text": "", "token_ids": [], "logprobs": None, "finish_reason": None}
            )
            choice["text"] += c.text
            self.completion_tokens += len(c.token_ids)
            lp = self._logprobs(c)
            if lp is not None:
                acc = choice["logprobs"] or {k: [] for k in lp}
                for k, v in lp.items():
                    acc[k].extend(v)
                choice["logprobs"] = acc
            if c.finish_reason:
                choice["finish_reason"] = finish_reason(c.finish_reason)

    def final(self) -> dict:
        choices = []
        for index in sorted(self.choices):
            c = self.choices[index]
            if self.chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": c["text"]},
                        "logprobs": c["logprobs"],
                        "finish_reason": c["finish_reason"],
                    }
                )
            else:
                choices.append(
                    {"index": index, "text": c["text"], "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}
                )
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
        for c in out.outputs:
            index = job.first_choice + c.index
            self.completion_tokens += len(c.token_ids)
            if not (c.text or c.finish_reason or c.token_ids):
                continue
            reason = finish_reason(c.finish_reason)
            if self.chat:
                delta: dict = {"content": c.text} if c.text else {}
                if index not in self._role_sent:
                    self._role_sent.add(index)
                    delta = {"role": "assistant", **delta, "content": c.text}
                choice = {"index": index, "delta": delta}
            else:
                choice = {"index": index, "text": c.text}
            choice.update(logprobs=self._logprobs(c), finish_reason=reason)
            chunks.append(self._chunk([choice]))
        return chunks

    async def sse(self, first: tuple | None, stream: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
        async with contextlib.aclosing(stream):
            try:
                if first is not None:
                    for chunk in self._chunks(*first):
                        yield chunk
                async for job, out in stream:
                    for chunk in self._chunks(job, out):
                        yield chunk
            except (ValueError, QueueFullError, Unavailable, EngineDeadError) as e:
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
    ):
        self.socket = socket.create_server((host, port))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            BodySizeLimit(OpenAIApp(core, api_key), max_body_bytes),
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
