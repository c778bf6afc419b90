"""Grammar compilation off the engine thread: a small worker pool, a cache keyed by specification, a bound on
the wait.

llguidance drops the GIL while it builds a grammar, so a heavy schema compiling in a worker does not slow the
engine thread's steps. A request waits for its grammar with ``timeout`` seconds at most (its own error if the
grammar fails or is late); the compile itself runs on (llguidance's parser limits bound it) and its result
stays cached for the next request with the same specification.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import llguidance.numpy as llg_numpy

from jserve.sampling_params import StructuredOutputsParams
from jserve.structured.grammar import grammar_text
from jserve.structured.matcher import GrammarState
from jserve.structured.vocab import grammar_tokenizer

if TYPE_CHECKING:
    from jserve.tokenizer import Tokenizer


class CompiledGrammar:
    """A compiled grammar in its start state; every sequence constrained by it gets a copy (``new_state``)."""

    def __init__(self, key: tuple[str, str], matcher: llguidance.LLMatcher):
        self.key = key
        self._matcher = matcher

    def new_state(self) -> GrammarState:
        return GrammarState(self._matcher.deep_copy())


class GrammarCompiler:
    """Compiles ``StructuredOutputsParams`` for one engine's vocabulary (shared by data-parallel replicas)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        *,
        timeout: float = 10.0,
        max_workers: int = 2,
        cache_size: int = 256,
    ):
        if timeout <= 0:
            raise ValueError(f"structured_output_timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self.vocab_size = vocab_size
        self._tokenizer, self._eos = tokenizer, list(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="jserve-grammar")
        self._cache: collections.OrderedDict[tuple[str, str], concurrent.futures.Future] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _vocabulary(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = grammar_tokenizer(self._tokenizer, self.vocab_size, self._eos)
            return self._ll_tokenizer

    def _compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Runs in a worker. The first mask is computed here too, so lazily built lexer states are paid for
        off the engine thread."""
        text = grammar_text(spec)
        matcher = llguidance.LLMatcher(self._vocabulary(), text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{spec.kind}: {matcher.get_error()}")
        mask = llg_numpy.allocate_token_bitmask(1, self.vocab_size)
        llg_numpy.fill_next_token_bitmask(matcher.deep_copy(), mask, 0)
        return CompiledGrammar(spec.key(), matcher)

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        """The compile's future, shared by every request with an equal specification."""
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def _timed_out(self, spec: StructuredOutputsParams) -> ValueError:
        return ValueError(
            f"structured_outputs.{spec.kind}: the grammar did not compile within {self.timeout:g} s"
            " (structured_output_timeout); simplify it"
        )

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Blocks the calling thread (never the engine's) for at most ``timeout`` seconds."""
        try:
            return self.submit(spec).result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(spec) from None

    async def compile_async(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """``compile`` for the asyncio loop: awaits the shared future without cancelling it on timeout."""
        future = asyncio.wrap_future(self.submit(spec))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            raise self._timed_out(spec) from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
