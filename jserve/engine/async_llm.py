"""AsyncLLM: an asyncio front over an Engine that steps on its own thread.

Hand-off 1 (loop -> engine thread): ``Engine.add_request`` / ``abort_request`` enqueue into the engine's inbox, and
a ``threading.Event`` wakes the idle engine thread. Hand-off 2 (engine thread -> loop): each delta goes to its
request's ``asyncio.Queue`` via ``loop.call_soon_threadsafe``. A request the engine refused (its final delta
carries ``error``) raises ``RequestFailedError`` in its consumer alone. If ``Engine.step`` itself raises (the
engine isolates failures inside a step, so this means the engine is broken), every in-flight request receives
the exception, the engine is marked dead (``errored``), and later calls fail fast instead of hanging.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from jserve.engine.engine import Engine
from jserve.lora.request import LoRARequest
from jserve.outputs import RequestOutput
from jserve.sampling_params import SamplingParams


class EngineError(RuntimeError):
    """The engine could not serve this request; the server reports INTERNAL (HTTP 500)."""


class EngineDeadError(EngineError):
    """The engine thread failed; the server reports INTERNAL and turns health NOT_SERVING."""


class RequestFailedError(EngineError):
    """The engine refused this request alone (a step it was in kept failing; ``RequestOutput.error``); the
    engine goes on serving the others."""


class QueueFullError(RuntimeError):
    """Too many requests in flight (max_queue_size); the server reports RESOURCE_EXHAUSTED."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    """Async generate()/abort() over one Engine; safe to share across coroutines of one event loop."""

    def __init__(self, engine: Engine, *, max_queue_size: int | None = None):
        self.engine = engine
        self.max_queue_size = max_queue_size
        self.errored: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._ids = itertools.count()
        self._step_started: float | None = None  # monotonic time the running step began; None between steps
        self._thread = threading.Thread(target=self._run, name="jserve-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def step_seconds(self) -> float:
        """How long the engine thread has been inside its current step (admission included); 0 when idle.
        A value far above a normal step means the engine is stuck (the server's health watches it)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def thread_alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            self._step_started = time.monotonic()
            try:
                deltas = self.engine.step()
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting clients
                self.errored = exc
                self._fail_all(exc)
                return
            finally:
                self._step_started = None
            for delta in deltas:
                self._deliver(delta.request_id, delta)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for request_id in ids:
            self._deliver(request_id, EngineDeadError(f"engine step failed: {exc!r}"))

    # ------------------------------------------------------------------ public

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        prompt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields deltas until the request finishes; cancelling the consumer aborts the request.
        ``lora_request``: the adapter to run with; a new adapter is read from disk off this loop."""
        if self.errored is not None:
            raise EngineDeadError(f"engine is dead: {self.errored!r}")
        params = sampling_params or SamplingParams()
        grammar = None
        if params.structured_outputs is not None:  # compiled in the engine's pool; this loop only awaits it
            grammar = await self.engine.grammar_compiler().compile_async(params.structured_outputs)
        adapter = None
        if lora_request is not None:  # read (and checked) off this loop; cancelling here leaves nothing behind
            adapter = await asyncio.to_thread(self.engine.register_adapter, lora_request)
        request_id = request_id or f"async-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self.max_queue_size is not None and len(self._streams) >= self.max_queue_size:
                raise QueueFullError(f"{len(self._streams)} requests in flight (max_queue_size)")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = stream
        finished = False
        try:
            self.engine.add_request(
                prompt_token_ids,
                params,
                request_id=request_id,
                prompt=prompt,
                grammar=grammar,
                lora_request=lora_request,
                lora_adapter=adapter,
            )
            self._wake.set()
            # NOTE: the engine may have died after the check above and snapshotted _streams before this
            # stream was in it; errored is set before that snapshot, so this check means nobody waits forever.
            if self.errored is not None:
                raise EngineDeadError(f"engine is dead: {self.errored!r}")
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(item.error)
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished and self.errored is None:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._wake.set()

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
