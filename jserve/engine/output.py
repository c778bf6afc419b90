"""From sampled tokens to what users see: text deltas, stop strings, logprobs, finish reasons, metrics.

One ``RequestGroup`` per user request (n samples, each a ``SampleState``). The engine feeds it every new token and
asks it for deltas; it never touches the scheduler or the device. Text that could be the start of a stop string
is held back until it is known not to be one, so a stop string is never streamed and then retracted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jserve.engine.request import Request
from jserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from jserve.engine.batch import PromptLogprobRows
    from jserve.engine.runner import StepResult
    from jserve.tokenizer import IncrementalDetokenizer


@dataclass
class SampleState:
    """Per-sequence streaming state: text decided so far and how much of it was already emitted."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    text: str = ""  # all text decided so far (emitted + held back)
    emitted_chars: int = 0
    emitted_tokens: int = 0
    detokenized_tokens: int = 0  # output tokens the detokenizer has taken
    logprobs: list[dict[int, float]] = field(default_factory=list)
    emitted_logprobs: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    reported_finish: bool = False


def find_stop_string(stops: list[str], sample: SampleState) -> bool:
    """Finds a stop string in the not-yet-emitted text (plus overlap); truncates the text before it."""
    longest = max(len(s) for s in stops)
    search_from = max(0, sample.emitted_chars - longest + 1)
    hits = [(sample.text.find(s, search_from), s) for s in stops]
    hits = [(pos, s) for pos, s in hits if pos >= 0]
    if not hits:
        return False
    pos, stop = min(hits)
    sample.text = sample.text[:pos]
    sample.finish_reason, sample.stop_reason = "stop", stop
    return True


def _top_logprobs(ids, logprobs, k: int) -> dict[int, float]:
    return {int(t): float(lp) for t, lp in zip(ids[:k], logprobs[:k], strict=True)}


@dataclass
class RequestGroup:
    """One user request (possibly n samples)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    samples: dict[str, SampleState]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprobs_sent: bool = False
    stream: bool = True  # False: the engine reports the group once, when every sample has finished
    error: str | None = None  # the engine refused it (finish_reason "error"): the cause

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())

    @property
    def needs_text_per_token(self) -> bool:
        """Streamed, or stop strings to look for: text follows every token. Otherwise (``LLM.generate`` without
        stop strings) nobody reads the text before the end, so it is decoded once then (``_catch_up_text``):
        two tokenizer decodes per token and step were ~10% of a 64-row decode step's host time."""
        return self.stream or bool(self.params.stop)

    @staticmethod
    def _catch_up_text(sample: SampleState, request: Request) -> None:
        """Detokenizes the sample's tokens not decoded yet, all of them if it has finished."""
        if sample.detokenizer is None:
            return
        new = request.output_token_ids[sample.detokenized_tokens :]
        if new:
            sample.text += sample.detokenizer.add(new)
            sample.detokenized_tokens += len(new)
        if sample.finish_reason is not None:
            sample.text += sample.detokenizer.flush()

    def record_prompt_logprobs(self, rows: PromptLogprobRows, result: StepResult) -> None:
        """Prompt logprobs from one chunk's rows, each position recorded once: siblings repeat them, and a
        request preempted mid-prompt recomputes it in chunks that may straddle what it had recorded (the budget
        cut them elsewhere), so the positions not recorded yet are taken from wherever they come."""
        k = self.params.prompt_logprobs or 0
        if self.prompt_logprobs is None:
            return
        for j in range(rows.count):
            position = rows.first_position + j + 1
            if position >= len(self.prompt_token_ids) or position > len(self.prompt_logprobs):
                break  # the end, or a gap (never: chunks run in order)
            if position < len(self.prompt_logprobs):
                continue  # recorded already
            row = rows.start + j
            entry = _top_logprobs(result.prompt_top_ids[row], result.prompt_top_logprobs[row], k)
            entry[self.prompt_token_ids[position]] = float(result.prompt_target_logprobs[row])
            self.prompt_logprobs.append(entry)

    def on_token(
        self,
        request: Request,
        result: StepResult,
        row: int,
        position: int = 0,
        token: int | None = None,
        *,
        final: bool = True,
    ) -> bool:
        """Takes one new token (default: the request's newest), the ``position``-th its step row produced;
        ``final``: the last new token of this step. True when a stop string ended the sample."""
        sample = self.samples[request.request_id]
        token = request.output_token_ids[-1] if token is None else token
        if self.params.logprobs is not None:
            chosen, top_ids, top_lps = result.token_logprobs(row, position)
            entry = {} if top_ids is None else _top_logprobs(top_ids, top_lps, self.params.logprobs)
            entry[token] = chosen
            sample.logprobs.append(entry)
        if sample.detokenizer is not None and self.needs_text_per_token:
            sample.text += sample.detokenizer.add([token])
            sample.detokenized_tokens += 1
            if request.is_finished and final:
                sample.text += sample.detokenizer.flush()
        if self.params.stop and find_stop_string(self.params.stop, sample):
            return True
        if request.is_finished and final and sample.finish_reason is None:
            sample.finish_reason, sample.stop_reason = request.finish_reason, request.stop_reason
        return False

    def delta(self, requests: dict[str, Request], seq_ids: list[str]) -> RequestOutput:
        """What is new for these samples since the last delta (finished samples flush their held-back text)."""
        completions = []
        holdback = max((len(s) for s in self.params.stop), default=1) - 1
        for seq_id in seq_ids:
            sample = self.samples[seq_id]
            request = requests[seq_id]
            if not self.needs_text_per_token:
                self._catch_up_text(sample, request)
            finished = sample.finish_reason is not None
            end = len(sample.text) if finished else max(sample.emitted_chars, len(sample.text) - holdback)
            logprobs = sample.logprobs[sample.emitted_logprobs :] if self.params.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    index=sample.index,
                    text=sample.text[sample.emitted_chars : end],
                    token_ids=list(request.output_token_ids[sample.emitted_tokens :]),
                    logprobs=logprobs,
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason,
                )
            )
            sample.emitted_chars, sample.emitted_tokens = end, len(request.output_token_ids)
            sample.emitted_logprobs = len(sample.logprobs)
            sample.reported_finish = finished
        prompt_logprobs = None
        if self.prompt_logprobs is not None and len(self.prompt_logprobs) == len(self.prompt_token_ids):
            if not self.prompt_logprobs_sent:
                prompt_logprobs = self.prompt_logprobs
                self.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=completions,
            finished=self.finished,
            metrics=self.metrics(requests),
            error=self.error if self.finished else None,
        )

    def metrics(self, requests: dict[str, Request]) -> RequestMetrics:
        seqs = [requests[s] for s in self.samples]
        firsts = [r.first_token_time for r in seqs if r.first_token_time is not None]
        ends = [r.finished_time for r in seqs if r.finished_time is not None]
        scheduled = [r.first_scheduled_time for r in seqs if r.first_scheduled_time is not None]
        finished_time = None
        if self.finished:
            finished_time = max(ends) if ends else time.time()
        return RequestMetrics(
            arrival_time=self.arrival_time,
            first_scheduled_time=min(scheduled) if scheduled else None,
            first_token_time=min(firsts) if firsts else None,
            finished_time=finished_time,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_output_tokens=sum(r.num_output_tokens for r in seqs),
            num_cached_tokens=max((r.num_cached_tokens for r in seqs), default=0),
            num_draft_tokens=sum(r.num_draft_tokens for r in seqs),
            num_accepted_tokens=sum(r.num_accepted_tokens for r in seqs),
        )
