"""Held-out perplexity: token windows, a bigram baseline, and jserve's own perplexity through ``prompt_logprobs``.

Every perplexity here is over the same predicted tokens: a file becomes ``[BOS] + ids + [EOS]``, cut into
non-overlapping windows of at most ``window`` tokens; in each window every token but the first is predicted
from the ones before it in that window. The bigram baseline scores exactly those tokens (each from its
predecessor), so the ratio of model to bigram perplexity says what the model learned beyond bigrams.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


def file_windows(token_ids: Sequence[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of at most ``window`` tokens; a trailing window of one token predicts nothing
    and is dropped."""
    if window < 2:
        raise ValueError(f"window: must be at least 2, got {window}")
    ids = list(token_ids)
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


@dataclass(frozen=True)
class Perplexity:
    """Summed negative log-likelihood over ``num_tokens`` predicted tokens."""

    nll: float
    num_tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.num_tokens) if self.num_tokens else float("nan")


class BigramModel:
    """A bigram language model with Witten-Bell interpolation towards an add-one unigram.

    Parameter-free (no smoothing constant to tune on the held-out data) and a standard baseline:
    P(b | a) = (c(a, b) + T(a) * P_uni(b)) / (c(a) + T(a)), where T(a) is the number of distinct successors
    of a seen in training; an unseen a falls back to P_uni(b) = (c(b) + 1) / (N + V).
    """

    def __init__(self, sequences: Iterable[Sequence[int]], vocab_size: int):
        self.vocab_size = vocab_size
        arrays = [np.asarray(seq, dtype=np.int64) for seq in sequences]
        unigram = np.bincount(np.concatenate(arrays), minlength=vocab_size)
        pairs = np.concatenate([ids[:-1] * vocab_size + ids[1:] for ids in arrays])  # within sequences only
        self._pairs = np.bincount(pairs, minlength=vocab_size * vocab_size).reshape(vocab_size, vocab_size)
        self._context = self._pairs.sum(axis=1)
        self._types = (self._pairs > 0).sum(axis=1)
        self._unigram = (unigram + 1) / (unigram.sum() + vocab_size)

    def log_probs(self, previous: np.ndarray, current: np.ndarray) -> np.ndarray:
        """Natural-log probability of each ``current`` token after its ``previous`` one."""
        previous = np.asarray(previous, dtype=np.int64)
        current = np.asarray(current, dtype=np.int64)
        uni = self._unigram[current]
        context = self._context[previous].astype(np.float64)
        types = self._types[previous].astype(np.float64)
        pair = self._pairs[previous, current].astype(np.float64)
        seen = context > 0
        prob = np.where(seen, (pair + types * uni) / np.maximum(context + types, 1.0), uni)
        return np.log(prob)

    def perplexity(self, windows: Iterable[Sequence[int]]) -> Perplexity:
        nll, count = 0.0, 0
        for window in windows:
            ids = np.asarray(window, dtype=np.int64)
            nll -= float(self.log_probs(ids[:-1], ids[1:]).sum())
            count += len(ids) - 1
        return Perplexity(nll, count)


def llm_perplexity(llm, windows: Sequence[Sequence[int]], *, progress: bool = True) -> Perplexity:
    """Perplexity through jserve's public API: one request per window, ``prompt_logprobs=0`` and one
    generated token, all submitted together so the engine batches them."""
    from jserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate(prompt_token_ids=[list(w) for w in windows], sampling_params=params, use_tqdm=progress)
    nll, count = 0.0, 0
    for window, output in zip(windows, outputs, strict=True):
        entries = output.prompt_logprobs
        for token_id, entry in zip(window[1:], entries[1:], strict=True):
            nll -= entry[token_id]
            count += 1
    return Perplexity(nll, count)


def reference_perplexity(model_dir: str, windows: Sequence[Sequence[int]], *, dtype: str = "float32") -> Perplexity:
    """transformers' perplexity on the same windows (the numerical reference)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), local_files_only=True
    ).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([list(window)])
            logits = model(input_ids=ids).logits[0, :-1].double()
            logprobs = torch.log_softmax(logits, dim=-1)
            nll -= float(logprobs.gather(1, ids[0, 1:, None]).sum())
            count += len(window) - 1
    return Perplexity(nll, count)
