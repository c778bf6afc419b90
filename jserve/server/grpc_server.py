"""grpc.aio servicers (``jserve.v1.Generation``, JetStream's ``Orchestrator``), health, reflection, server.

Concurrency story: every RPC runs as a task on the one asyncio loop that also owns ``AsyncLLM``'s queues. A
streaming handler iterates ``ServingCore.generate`` under ``aclosing``, so however the call ends - the
client cancels or disconnects (grpc cancels the task), the deadline passes (``asyncio.timeout``), or the
handler fails - the generator is closed at once and ``AsyncLLM`` aborts the request, whose pages the engine
frees in its next step. Handlers write with ``context.write`` rather than ``yield`` so that every await (and
so every cancellation) happens inside the handler's own ``try``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jserve.lora.registry import AdapterNotFoundError
from jserve.lora.request import LoRARequest
from jserve.sampling_params import SamplingParams
from jserve.server.auth import ApiKeyInterceptor
from jserve.server.core import EngineError, QueueFullError, RequestTooLargeError, ServingCore, Unavailable
from jserve.server.gen import jetstream_pb2, jetstream_pb2_grpc, jserve_pb2, jserve_pb2_grpc
from jserve.server.protocol import ResponseBuilder, sampling_from_proto

logger = logging.getLogger(__name__)

GENERATION_SERVICE = jserve_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ORCHESTRATOR_SERVICE = jetstream_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
SERVICES = (GENERATION_SERVICE, ORCHESTRATOR_SERVICE)
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


@dataclass(frozen=True, kw_only=True)
class GrpcOptions:
    host: str = "127.0.0.1"
    port: int = 9000
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_cert: str | None = None
    tls_key: str | None = None
    api_key: str | None = None


@contextlib.asynccontextmanager
async def _status_errors(context: grpc.aio.ServicerContext, core: ServingCore) -> AsyncIterator[None]:
    """Maps ServingCore's exceptions to status codes (see jserve.server.core)."""
    try:
        yield
    except AdapterNotFoundError as e:
        core.metrics.record_outcome("invalid")
        await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
    except RequestTooLargeError as e:
        core.metrics.record_outcome("invalid")
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    except ValueError as e:
        core.metrics.record_outcome("invalid")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except QueueFullError as e:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is at capacity: {e}")
    except Unavailable as e:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except EngineError as e:
        await context.abort(grpc.StatusCode.INTERNAL, str(e))
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded; the request was aborted")


def _adapter(core: ServingCore, name: str, field: str) -> LoRARequest | None:
    """The loaded adapter ``name`` selects (empty: the base model); NOT_FOUND when unknown."""
    if not name:
        return None
    if core.adapters is None:
        raise ValueError(f"{field}: this server serves no LoRA adapters (start it with --enable-lora)")
    return core.adapters.get(name)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 0.0)


def _deadline_checker(context: grpc.aio.ServicerContext):
    """For metrics: a call cancelled within 100 ms of its deadline counts as a deadline, not a cancel (grpc's
    own deadline cancellation and our timer race, and clocks differ slightly)."""

    def passed() -> bool:
        remaining = context.time_remaining()
        return remaining is not None and remaining < 0.1

    return passed


class GenerationServicer(jserve_pb2_grpc.GenerationServicer):
    """``jserve.v1.Generation``."""

    def __init__(self, core: ServingCore):
        self.core = core

    async def Generate(self, request: jserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        arrival = time.perf_counter()
        async with _status_errors(context, self.core):
            self.core.check_accepting()
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            text, ids = self.core.encode_prompt(request.prompt, request.token_ids, add_special_tokens=add_special)
            params = sampling_from_proto(request.sampling)
            lora = _adapter(self.core, request.lora_name, "lora_name")
            request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
            builder = ResponseBuilder()
            async with asyncio.timeout(_deadline(context)):
                stream = self.core.generate(
                    ids,
                    params,
                    request_id=request_id,
                    prompt=text,
                    arrival=arrival,
                    deadline_passed=_deadline_checker(context),
                    lora_request=lora,
                )
                async with contextlib.aclosing(stream):
                    async for out in stream:
                        for response in builder.build(out):
                            await context.write(response)

    async def Tokenize(self, request: jserve_pb2.TokenizeRequest, context) -> jserve_pb2.TokenizeResponse:
        async with _status_errors(context, self.core):
            if self.core.tokenizer is None:
                raise ValueError("text: this model has no tokenizer")
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = self.core.tokenizer.encode(request.text, add_special_tokens=add_special)
            return jserve_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: jserve_pb2.DetokenizeRequest, context) -> jserve_pb2.DetokenizeResponse:
        async with _status_errors(context, self.core):
            if self.core.tokenizer is None:
                raise ValueError("token_ids: this model has no tokenizer")
            vocab = self.core.card.vocab_size
            bad = [t for t in request.token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token_ids: ids outside the vocabulary [0, {vocab}): {bad[:8]}")
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            text = self.core.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
            return jserve_pb2.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context) -> jserve_pb2.ModelInfo:
        card, stats = self.core.card, self.core.stats()
        return jserve_pb2.ModelInfo(
            model_name=card.name,
            vocab_size=card.vocab_size,
            max_model_len=card.max_model_len,
            parallel=jserve_pb2.ParallelLayout(
                tensor_parallel_size=card.tensor_parallel_size,
                pipeline_parallel_size=card.pipeline_parallel_size,
                data_parallel_size=card.data_parallel_size,
                num_devices=card.num_devices,
                platform=card.platform,
            ),
            page_size=card.page_size,
            pages_total=stats["pages_total"],
            pages_free=stats["pages_free"],
            pages_cached=stats["pages_cached"],
            num_running=stats["num_running"],
            num_waiting=stats["num_waiting"],
            max_num_seqs=card.max_num_seqs,
            dtype=card.dtype,
            weight_bytes=stats["weight_bytes"],
            kv_bytes_per_token=stats["kv_bytes_per_token"],
            quantization=card.quantization,
            kv_cache_dtype=card.kv_cache_dtype,
            speculative_method=stats.get("spec_method", ""),
            spec_num_draft_tokens=stats.get("spec_num_draft_tokens", 0),
            spec_num_accepted_tokens=stats.get("spec_num_accepted_tokens", 0),
            host_pages_total=stats.get("host_pages_total", 0),
            host_pages_used=stats.get("host_pages_used", 0),
            device_cache_hit_tokens=stats["prefix_cache_hits"] - stats.get("host_hit_tokens", 0),
            host_cache_hit_tokens=stats.get("host_hit_tokens", 0),
        )


class OrchestratorServicer(jetstream_pb2_grpc.OrchestratorServicer):
    """JetStream's ``Orchestrator``: greedy decoding (JetStream's default) for one sample; with
    ``num_samples > 1``, temperature 1 so that the samples differ. ``has_bos`` on a text prompt means the text
    already starts with BOS, so none is added; token prompts are used as given."""

    def __init__(self, core: ServingCore):
        self.core = core

    async def Decode(self, request: jetstream_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> None:
        arrival = time.perf_counter()
        async with _status_errors(context, self.core):
            self.core.check_accepting()
            lora = _adapter(self.core, request.lora_adapter_id, "lora_adapter_id")
            kind = request.WhichOneof("content")
            if kind is None:
                raise ValueError("content: set text_content or token_content")
            if kind == "text_content":
                text, ids = self.core.encode_prompt(
                    request.text_content.text, None, add_special_tokens=not request.has_bos
                )
            else:
                text, ids = self.core.encode_prompt(None, request.token_content.token_ids)
                if not ids:
                    raise ValueError("token_content.token_ids must not be empty")
            if request.num_samples < 0:
                raise ValueError(f"num_samples must be >= 0 (0 means 1), got {request.num_samples}")
            n = request.num_samples or 1
            if n > self.core.limits.max_n:
                raise ValueError(f"num_samples: got {n}; at most {self.core.limits.max_n} allowed (max_n)")
            params = SamplingParams(n=n, max_tokens=request.max_tokens, temperature=0.0 if n == 1 else 1.0)
            async with asyncio.timeout(_deadline(context)):
                stream = self.core.generate(
                    ids,
                    params,
                    request_id=f"jetstream-{uuid.uuid4().hex}",
                    prompt=text,
                    arrival=arrival,
                    deadline_passed=_deadline_checker(context),
                    lora_request=lora,
                )
                async with contextlib.aclosing(stream):
                    async for out in stream:
                        if not any(c.token_ids or c.text for c in out.outputs):
                            continue
                        samples = [jetstream_pb2.DecodeResponse.StreamContent.Sample() for _ in range(n)]
                        for c in out.outputs:
                            samples[c.index].text, samples[c.index].token_ids[:] = c.text, c.token_ids
                        await context.write(
                            jetstream_pb2.DecodeResponse(
                                stream_content=jetstream_pb2.DecodeResponse.StreamContent(samples=samples)
                            )
                        )

    async def HealthCheck(self, request, context) -> jetstream_pb2.HealthCheckResponse:
        return jetstream_pb2.HealthCheckResponse(is_live=self.core.serving)


class HealthReporter:
    """``grpc.health.v1`` status for the whole server ("") and each service, driven by ServingCore events."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._tasks: set[asyncio.Task] = set()

    async def set_serving(self, serving: bool) -> None:
        statuses = health_pb2.HealthCheckResponse
        status = statuses.SERVING if serving else statuses.NOT_SERVING
        for service in ("", *SERVICES):
            await self.servicer.set(service, status)

    async def shutting_down(self) -> None:
        await self.servicer.enter_graceful_shutdown()

    def mark_not_serving(self) -> None:
        """Sync entry point (engine death is noticed in sync code); runs the update on the loop."""
        task = asyncio.get_running_loop().create_task(self.set_serving(False))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def build_grpc_server(core: ServingCore, options: GrpcOptions) -> tuple[grpc.aio.Server, HealthReporter, int]:
    """A configured, not yet started server; returns it, its health reporter and the bound port."""
    server_options = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.so_reuseport", 0),  # never share a port with another server by accident
    ]
    interceptors = [ApiKeyInterceptor(options.api_key)] if options.api_key else []
    server = grpc.aio.server(options=server_options, interceptors=interceptors)
    jserve_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(core), server)
    jetstream_pb2_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(core), server)
    reporter = HealthReporter()
    health_pb2_grpc.add_HealthServicer_to_server(reporter.servicer, server)
    reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    core.on_engine_dead(reporter.mark_not_serving)

    address = f"{options.host}:{options.port}"
    if options.tls_cert or options.tls_key:
        if not (options.tls_cert and options.tls_key):
            raise ValueError("tls: pass both --tls-cert and --tls-key")
        with open(options.tls_key, "rb") as f_key, open(options.tls_cert, "rb") as f_cert:
            credentials = grpc.ssl_server_credentials([(f_key.read(), f_cert.read())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC to {address}")
    return server, reporter, port
