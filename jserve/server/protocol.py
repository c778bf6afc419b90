"""Wire <-> engine types for ``jserve.v1``: proto -> SamplingParams, RequestOutput -> GenerateResponses.

Kept apart from the servicers so that the translation rules (which unset fields take defaults, how a float32
on the wire reads back, how n > 1 deltas are split) can be read and tested on their own.
"""

from __future__ import annotations

import numpy as np

from jserve.outputs import CompletionOutput, RequestOutput
from jserve.sampling_params import SamplingParams, StructuredOutputsParams
from jserve.server.gen import jserve_pb2 as pb

_OPTIONAL_INTS = ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs")
_OPTIONAL_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Only the fields the client set override SamplingParams' defaults; ValueError names a bad field."""
    kwargs: dict = {}
    for name in _OPTIONAL_INTS:
        if msg.HasField(name):
            kwargs[name] = int(getattr(msg, name))
    for name in _OPTIONAL_FLOATS:
        if msg.HasField(name):
            kwargs[name] = _float32(getattr(msg, name))
    for name in ("skip_special_tokens", "speculative"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    if msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        bad = [t for t in msg.stop_token_ids if t < 0]
        if bad:
            raise ValueError(f"stop_token_ids must be non-negative, got {bad[0]}")
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    kwargs["ignore_eos"] = msg.ignore_eos
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_from_proto(msg.structured_outputs)
    return SamplingParams(**kwargs)


def structured_from_proto(msg: pb.StructuredOutputs) -> StructuredOutputsParams:
    """The one kind the client set (ValueError naming structured_outputs when none is)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs: set one of json, json_object, regex, choice, grammar")
    if kind == "choice":
        return StructuredOutputsParams(choice=list(msg.choice.choices))
    return StructuredOutputsParams(**{kind: getattr(msg, kind)})


def _float32(value: float) -> float:
    """The float the client most likely wrote: 0.8 arrives as 0.800000011920929 (float32) and reads back as
    0.8. The device computes in float32 anyway, so this changes no result, only error messages."""
    return float(str(np.float32(value)))


def _token_logprobs(token_id: int, entry: dict[int, float] | None) -> pb.TokenLogprobs:
    if not entry:
        return pb.TokenLogprobs()
    top = sorted(entry.items(), key=lambda kv: -kv[1])
    return pb.TokenLogprobs(
        token_id=token_id,
        logprob=entry.get(token_id, 0.0),
        top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top],
    )


def _sample_response(request_id: str, c: CompletionOutput) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(
        request_id=request_id, index=c.index, token_ids=c.token_ids, text=c.text, finish_reason=c.finish_reason or ""
    )
    if c.logprobs is not None:
        resp.logprobs.extend(_token_logprobs(t, e) for t, e in zip(c.token_ids, c.logprobs, strict=False))
    if isinstance(c.stop_reason, str):
        resp.stop_string = c.stop_reason
    elif isinstance(c.stop_reason, int):
        resp.stop_token_id = c.stop_reason
    return resp


class ResponseBuilder:
    """Turns one request's deltas into GenerateResponses, counting tokens for the final usage."""

    def __init__(self) -> None:
        self.completion_tokens = 0

    def build(self, out: RequestOutput) -> list[pb.GenerateResponse]:
        """One response per sample that changed; a delta with nothing new yields one only when it finishes."""
        responses = [
            _sample_response(out.request_id, c) for c in out.outputs if c.token_ids or c.text or c.finish_reason
        ]
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
        if out.prompt_logprobs is not None:
            if not responses:
                responses.append(pb.GenerateResponse(request_id=out.request_id))
            responses[0].prompt_logprobs.extend(
                _token_logprobs(t, e) for t, e in zip(out.prompt_token_ids, out.prompt_logprobs, strict=False)
            )
        if out.finished:
            if not responses:
                responses.append(pb.GenerateResponse(request_id=out.request_id))
            last = responses[-1]
            last.finished = True
            cached = out.metrics.num_cached_tokens if out.metrics is not None else 0
            last.usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=len(out.prompt_token_ids),
                    completion_tokens=self.completion_tokens,
                    cached_prompt_tokens=cached,
                )
            )
        return responses
