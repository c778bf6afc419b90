"""LLM: the offline API (generate / generate_stream / chat / stats), driving the same Engine the server uses."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence

from tqdm.auto import tqdm

from jserve.bundled import BUNDLED_DRAFT_MODEL, BUNDLED_MODEL  # noqa: F401 - re-exported
from jserve.engine.engine import Engine
from jserve.engine.factory import build_engine
from jserve.engine_args import EngineArgs, llm_signature
from jserve.limits import check_prompt_chars
from jserve.lora.request import LoRARequest
from jserve.outputs import CompletionOutput, RequestOutput
from jserve.sampling_params import SamplingParams


class LLM:
    """An offline engine over one model. Arguments follow vLLM's ``LLM`` (docs/api.md)."""

    def __init__(self, model: str | os.PathLike | None = None, **engine_args):
        """Keyword arguments are the fields of ``EngineArgs`` (jserve/engine_args.py; the same settings as
        ``python -m jserve.launch``'s flags); ``model`` defaults to the bundled tiny model. Returns once every
        step program is compiled, so no request within the limits compiles anything."""
        args = EngineArgs.from_kwargs(**({"model": model} if model is not None else {}), **engine_args)
        self.engine: Engine = build_engine(args)
        self.tokenizer = self.engine.tokenizer
        self.args = args

    # ------------------------------------------------------------------ requests

    def _prompts(
        self, prompts: str | Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None
    ) -> list[tuple[str | None, list[int]]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("prompts: pass exactly one of prompts or prompt_token_ids")
        if prompt_token_ids is not None:
            if not prompt_token_ids or isinstance(prompt_token_ids[0], int):
                raise ValueError("prompt_token_ids must be a non-empty list of token-id lists")
            return [(None, [_token_id(t) for t in ids]) for ids in prompt_token_ids]
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts must not be empty")
        if self.tokenizer is None:
            raise ValueError("prompts: this model has no tokenizer; pass prompt_token_ids instead")
        out = []
        for text in prompts:
            if not isinstance(text, str) or not text:
                raise ValueError("prompt must be a non-empty string")
            check_prompt_chars("prompt", text, self.engine.max_model_len)
            out.append((text, self.tokenizer.encode(text)))
        return out

    def _add_all(self, prompts, sampling_params, *, stream: bool = True, lora_request=None) -> list[str]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")
        for p in params:  # validate everything before enqueuing anything
            if not isinstance(p, SamplingParams):
                raise ValueError("sampling_params must be SamplingParams or a list of them")
        for (_, ids), p in zip(prompts, params, strict=True):
            self.engine.validate(ids, p)
        adapters = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"lora_request: got {len(adapters)} for {len(prompts)} prompts")
        # each adapter read (and checked) once, before anything is enqueued; its copy goes with every request
        copies = {a: self.engine.register_adapter(a) for a in dict.fromkeys(adapters) if a is not None}
        grammars = self._compile_grammars(params)
        return [
            self.engine.add_request(
                ids, p, prompt=text, stream=stream, grammar=g, lora_request=a, lora_adapter=copies.get(a)
            )
            for (text, ids), p, g, a in zip(prompts, params, grammars, adapters, strict=True)
        ]

    def _compile_grammars(self, params: list[SamplingParams]) -> list:
        """Every structured-outputs grammar, compiled in parallel in the engine's pool before anything is
        enqueued (one that fails raises ValueError and nothing runs)."""
        if all(p.structured_outputs is None for p in params):
            return [None] * len(params)
        compiler = self.engine.grammar_compiler()
        for p in params:
            if p.structured_outputs is not None:
                compiler.submit(p.structured_outputs)
        return [None if p.structured_outputs is None else self.engine.compile_grammar(p) for p in params]

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt with continuous batching; returns outputs in prompt order.
        ``lora_request``: one adapter for every prompt, or one per prompt (None: the base model)."""
        # final outputs only: nobody reads per-step deltas here (see Engine.add_request)
        prompts = self._prompts(prompts, prompt_token_ids)
        request_ids = self._add_all(prompts, sampling_params, stream=False, lora_request=lora_request)
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm, unit="req") as bar:
            try:
                done = 0
                while done < len(request_ids):
                    for delta in self.engine.step():
                        merged = _merge(final.get(delta.request_id), delta)
                        final[delta.request_id] = merged
                        if merged.finished:
                            done += 1
                            bar.update(1)
            except BaseException:
                for rid in request_ids:
                    self.engine.abort_request(rid)
                self.engine.step()
                raise
        return [final[rid] for rid in request_ids]

    def generate_stream(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        lora_request: LoRARequest | None = None,
    ) -> Iterator[RequestOutput]:
        """Yields RequestOutput deltas (new text/tokens only) for one prompt as they are generated."""
        if isinstance(prompt, str):
            prompts = self._prompts(prompt, None)
        else:
            prompts = self._prompts(None, [prompt])
        (request_id,) = self._add_all(prompts, sampling_params, lora_request=lora_request)
        finished = False
        try:
            while not finished:
                for delta in self.engine.step():
                    if delta.request_id == request_id:
                        finished = delta.finished
                        yield delta
        finally:
            if not finished:
                self.engine.abort_request(request_id)
                self.engine.step()

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Applies the checkpoint's chat template, then generates (one conversation or a list of them).
        ``tools``: OpenAI function definitions the template shows the model (vLLM's ``LLM.chat(tools=...)``)."""
        if self.tokenizer is None:
            raise ValueError("messages: this model has no tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not conversations:
            raise ValueError("messages must not be empty")
        token_ids = [
            self.tokenizer.apply_chat_template(
                c, add_generation_prompt=True, tokenize=True, chat_template=chat_template, tools=tools
            )
            for c in conversations
        ]
        return self.generate(
            prompt_token_ids=token_ids, sampling_params=sampling_params, use_tqdm=use_tqdm, lora_request=lora_request
        )

    def stats(self) -> dict[str, float | int]:
        """Engine state: page counts, queue lengths, preemptions, prefix-cache hit rate (docs/api.md)."""
        return self.engine.stats()

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix, on the device and in the host tier; False (nothing changed) while
        requests run."""
        return self.engine.reset_prefix_cache()


def _token_id(t) -> int:
    if isinstance(t, bool) or not isinstance(t, int):
        try:
            import numpy as np

            if isinstance(t, np.integer):
                return int(t)
        except ImportError:  # pragma: no cover
            pass
        raise ValueError(f"prompt_token_ids must hold integers, got {t!r}")
    return t


def _merge(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Accumulates streamed deltas into a full RequestOutput."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, None, [], False)
    by_index = {c.index: c for c in acc.outputs}
    for c in delta.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            prev = by_index[c.index] = CompletionOutput(c.index, "", [], [] if c.logprobs is not None else None)
        prev.text += c.text
        prev.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + c.logprobs
        prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.prompt_logprobs = delta.prompt_logprobs if delta.prompt_logprobs is not None else acc.prompt_logprobs
    acc.finished = delta.finished
    acc.metrics = delta.metrics
    acc.error = delta.error or acc.error
    return acc


LLM.__init__.__signature__ = llm_signature(inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY))
