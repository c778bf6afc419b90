"""The sampler: from the model's last-position logits to one token per row, inside the engine's jitted step.

Pure ``jax.numpy``; no Python control flow on traced values, so ``sample`` fuses into the step's jit with the
model forward. Which stages run is decided on the host, per step, by the hashable :class:`SamplerFlags`
(a static jit argument): a batch of greedy rows never pays for a sort or a PRNG, a batch without penalties
never builds the ``[B, V]`` count tables.

Pipeline for each row (all in float32)::

    raw logits --banned ids--> -inf
               --penalties--> repetition (prompt+output tokens), then frequency/presence (output tokens only)
               = "processed" logits; temperature-0 rows take their argmax here
               --/ temperature--> top-k -> renormalise -> top-p -> min-p (masked entries are -inf)
               --categorical with the row's key fold_in(key(seed), step)--> token

Masking uses ``-inf`` throughout. A masked row can never yield NaN: the filters always keep the top token,
probabilities are only used to build boolean masks (never written back into logits), and the Gumbel-argmax
of a row that is ``-inf`` everywhere (every token banned) returns token 0 rather than NaN.

Reported logprobs (chosen token and the top-k alternatives) are ``log_softmax`` of the RAW model logits,
before any penalty, ban, temperature or filter, as vLLM reports by default.

Seed determinism: a row's random stream depends only on ``(seed, step)`` and the vocabulary size, so the same
seed, step and logits row give the same token whatever else is in the batch and wherever the row sits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jserve.sampling_params import SamplingParams

__all__ = [
    "RowSpec",
    "SamplerFlags",
    "SamplerOutput",
    "SamplingTensors",
    "filtered_logits",
    "make_sampling_tensors",
    "process_logits",
    "sample",
]

_NEG_INF = float("-inf")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling settings for B rows (padded rows: temperature 0, everything else neutral)."""

    temperature: jax.Array  # [B] f32; 0.0 = greedy (argmax)
    top_k: jax.Array  # [B] i32; 0 = off
    top_p: jax.Array  # [B] f32; 1.0 = off
    min_p: jax.Array  # [B] f32; 0.0 = off
    # [B] f32; 1.0 = off. Prompt AND output tokens (HF/vLLM): logit > 0 -> logit / p, else logit * p
    repetition_penalty: jax.Array
    presence_penalty: jax.Array  # [B] f32; 0 = off. logit -= presence * (count_in_output > 0)
    frequency_penalty: jax.Array  # [B] f32; 0 = off. logit -= frequency * count_in_output
    seeds: jax.Array  # [B] u32: per-request seed
    steps: jax.Array  # [B] i32: tokens this sample has generated so far; key = fold_in(key(seed), step)
    token_history: jax.Array  # [B, Hmax] i32: prompt+output ids for penalties, -1 = padding. Hmax may be 0.
    history_is_output: jax.Array  # [B, Hmax] bool: which history entries are output tokens
    banned_token_ids: jax.Array  # [B, Nb] i32: ids forced to -inf (min_tokens: EOS/stop ids), -1 = padding


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """Static (hashable) switches the host computes per step from the batch; a static jit argument."""

    all_greedy: bool = False  # skip all randomness/filters: argmax (banned ids and penalties still apply)
    use_penalties: bool = False  # any row has a non-neutral penalty
    use_filters: bool = False  # any sampled row has top_k>0, top_p<1 or min_p>0 (needs a sort)
    num_logprobs: int = 0  # static k: also return the top-k raw logprobs per row (0 = none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # [B] i32
    logprobs: jax.Array  # [B] f32: chosen token's log-prob under log_softmax of the RAW logits
    top_ids: jax.Array  # [B, k] i32, sorted by descending logprob ([B, 0] when k = 0)
    top_logprobs: jax.Array  # [B, k] f32 (raw-logit log_softmax)


# ----------------------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------------------


def _row_scatter_index(ids: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """(row index, column index) for a scatter over [B, V]; padding (-1) and out-of-range ids go to column V
    so that ``mode="drop"`` discards them (negative indices would otherwise wrap around to V-1)."""
    rows = jnp.arange(ids.shape[0], dtype=jnp.int32)[:, None]
    cols = jnp.where((ids >= 0) & (ids < vocab), ids, vocab).astype(jnp.int32)
    return rows, cols


def _apply_banned(logits: jax.Array, banned: jax.Array) -> jax.Array:
    if banned.shape[1] == 0:
        return logits
    rows, cols = _row_scatter_index(banned, logits.shape[1])
    return logits.at[rows, cols].set(_NEG_INF, mode="drop")


def _apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    hist = t.token_history
    if hist.shape[1] == 0:
        return logits
    batch, vocab = logits.shape
    rows, cols = _row_scatter_index(hist, vocab)
    valid = cols < vocab
    is_out = valid & t.history_is_output.astype(bool)
    seen = jnp.zeros((batch, vocab), jnp.int32).at[rows, cols].add(valid.astype(jnp.int32), mode="drop") > 0
    counts = jnp.zeros((batch, vocab), jnp.int32).at[rows, cols].add(is_out.astype(jnp.int32), mode="drop")

    rep = t.repetition_penalty.astype(jnp.float32)[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    counts_f = counts.astype(jnp.float32)
    logits = logits - t.frequency_penalty.astype(jnp.float32)[:, None] * counts_f
    logits = logits - t.presence_penalty.astype(jnp.float32)[:, None] * (counts > 0).astype(jnp.float32)
    return logits


def process_logits(logits: jax.Array, tensors: SamplingTensors, flags: SamplerFlags) -> jax.Array:
    """Float32 logits after banned ids (-> -inf) and, when ``flags.use_penalties``, the penalties.

    This is what greedy rows take the argmax of, and what temperature then scales for sampled rows.
    """
    x = logits.astype(jnp.float32)
    x = _apply_banned(x, tensors.banned_token_ids)
    if flags.use_penalties:
        x = _apply_penalties(x, tensors)
    return x


def _scale(processed: jax.Array, temperature: jax.Array) -> jax.Array:
    temp = temperature.astype(jnp.float32)
    temp = jnp.where(temp > 0, temp, 1.0)  # greedy rows: any finite value; their sample is discarded
    return processed / temp[:, None]


def _apply_filters(x: jax.Array, t: SamplingTensors) -> jax.Array:
    """top-k, then top-p on the top-k-renormalised distribution, then min-p; masked entries become -inf.

    One descending sort per row gives a per-row logit threshold; every token at or above it survives
    (tokens tied with the threshold are all kept). The top token always survives.
    """
    vocab = x.shape[1]
    sorted_x = -jnp.sort(-x, axis=-1)  # descending; -inf entries sort last
    pos = jnp.arange(vocab, dtype=jnp.int32)[None, :]

    k = t.top_k.astype(jnp.int32)
    k_eff = jnp.where((k > 0) & (k < vocab), k, vocab)[:, None]
    keep_k = pos < k_eff

    # top-p on the distribution renormalised over the top-k survivors: keep a token iff the mass of the
    # strictly-better tokens is < p (the smallest prefix whose mass reaches p). p >= 1 keeps everything, which
    # must not depend on float rounding of the cumulative sum.
    masked = jnp.where(keep_k, sorted_x, _NEG_INF)
    row_max = masked[:, :1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(masked - row_max)
    probs = e / jnp.sum(e, axis=-1, keepdims=True)
    exclusive_mass = jnp.cumsum(probs, axis=-1) - probs
    p = t.top_p.astype(jnp.float32)[:, None]
    keep_p = (exclusive_mass < p) | (p >= 1.0)

    keep = (keep_k & keep_p) | (pos == 0)  # a prefix of the sorted order, never empty
    count = jnp.sum(keep, axis=-1, keepdims=True, dtype=jnp.int32)
    threshold = jnp.take_along_axis(sorted_x, count - 1, axis=-1)

    # min-p: prob_i < min_p * max_prob  <=>  x_i - x_max < log(min_p) (renormalisation cancels in the ratio).
    min_p = t.min_p.astype(jnp.float32)[:, None]
    min_p_threshold = jnp.where(min_p > 0, sorted_x[:, :1] + jnp.log(jnp.maximum(min_p, 1e-30)), _NEG_INF)
    threshold = jnp.maximum(threshold, min_p_threshold)
    return jnp.where(x >= threshold, x, _NEG_INF)


def filtered_logits(logits: jax.Array, tensors: SamplingTensors, flags: SamplerFlags) -> jax.Array:
    """The logits sampled rows draw from: processed, divided by temperature (greedy rows: by 1), filtered when
    ``flags.use_filters`` (removed tokens are -inf)."""
    x = _scale(process_logits(logits, tensors, flags), tensors.temperature)
    if flags.use_filters:
        x = _apply_filters(x, tensors)
    return x


def _row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(
        seeds.astype(jnp.uint32), steps.astype(jnp.int32)
    )


def sample(logits: jax.Array, tensors: SamplingTensors, flags: SamplerFlags) -> SamplerOutput:
    """One token per row from ``logits`` [B, V] (any float dtype). ``flags`` must be static under jit."""
    raw = logits.astype(jnp.float32)
    processed = process_logits(raw, tensors, flags)
    greedy_ids = jnp.argmax(processed, axis=-1).astype(jnp.int32)

    if flags.all_greedy:
        token_ids = greedy_ids
    else:
        x = _scale(processed, tensors.temperature)
        if flags.use_filters:
            x = _apply_filters(x, tensors)
        keys = _row_keys(tensors.seeds, tensors.steps)
        sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x).astype(jnp.int32)
        token_ids = jnp.where(tensors.temperature.astype(jnp.float32) > 0, sampled, greedy_ids)

    logprobs_all = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logprobs_all, token_ids[:, None], axis=-1)[:, 0]
    k = int(flags.num_logprobs)
    if k > 0:
        top_logprobs, top_ids = jax.lax.top_k(logprobs_all, min(k, raw.shape[1]))
        top_ids = top_ids.astype(jnp.int32)
    else:
        top_logprobs = jnp.zeros((raw.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((raw.shape[0], 0), jnp.int32)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen, top_ids=top_ids, top_logprobs=top_logprobs)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One row of a sampling batch, as the engine knows it on the host."""

    params: SamplingParams
    seed: int  # resolved: the request's seed, or one the engine assigned
    step: int  # tokens this sample has generated so far
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    banned_token_ids: Sequence[int] = ()


def _fold_seed(seed: int) -> int:
    """Python int seed -> uint32: seeds below 2**32 map to themselves, wider ones xor-fold their high bits."""
    seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
    return (seed ^ (seed >> 32)) & 0xFFFF_FFFF if seed >> 32 else seed


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def make_sampling_tensors(
    rows: Sequence[RowSpec],
    *,
    history_len: int | None = None,
    banned_len: int | None = None,
    pad_to: int | None = None,
) -> tuple[SamplingTensors, SamplerFlags]:
    """Host-side (numpy) batch of sampling settings plus the static flags for this step.

    ``pad_to`` (>= len(rows)) appends neutral greedy rows. ``history_len`` / ``banned_len`` fix the widths
    of ``token_history`` / ``banned_token_ids`` (to bucket jit shapes); they default to the longest row and
    raise ``ValueError`` when too small. ``token_history`` is only built when some row uses penalties (else
    its width is 0), and only the penalised rows' histories are filled. The arrays are numpy; the caller
    device_puts them.
    """
    n = len(rows)
    b = n if pad_to is None else int(pad_to)
    if b < n:
        raise ValueError(f"pad_to must be >= the number of rows, got {b} < {n}")
    params = [r.params for r in rows]

    def column(values: list, dtype, pad_value) -> np.ndarray:
        out = np.full(b, pad_value, dtype=dtype)
        if n:
            out[:n] = values
        return out

    temperature = column([p.temperature for p in params], np.float32, 0.0)
    top_k = column([p.top_k for p in params], np.int32, 0)
    top_p = column([p.top_p for p in params], np.float32, 1.0)
    min_p = column([p.min_p for p in params], np.float32, 0.0)
    repetition = column([p.repetition_penalty for p in params], np.float32, 1.0)
    presence = column([p.presence_penalty for p in params], np.float32, 0.0)
    frequency = column([p.frequency_penalty for p in params], np.float32, 0.0)
    seeds = column([_fold_seed(r.seed) for r in rows], np.uint32, 0)
    steps = column([r.step for r in rows], np.int32, 0)

    sampled = temperature[:n] > 0
    all_greedy = not bool(sampled.any())
    use_filters = bool((sampled & ((top_k[:n] > 0) | (top_p[:n] < 1.0) | (min_p[:n] > 0.0))).any())
    penalised = (repetition[:n] != 1.0) | (presence[:n] != 0.0) | (frequency[:n] != 0.0)
    use_penalties = bool(penalised.any())
    num_logprobs = max((p.logprobs or 0 for p in params), default=0)

    # Penalty history: prompt then output, -1 padded; only for rows that have a penalty.
    if use_penalties:
        pen_rows = np.flatnonzero(penalised)
        prompt_lens = {int(i): len(rows[i].prompt_token_ids) for i in pen_rows}
        output_lens = {int(i): len(rows[i].output_token_ids) for i in pen_rows}
        needed = max(prompt_lens[i] + output_lens[i] for i in prompt_lens)
        width = needed if history_len is None else int(history_len)
        if width < needed:
            raise ValueError(f"history_len must be >= the longest penalised history, got {width} < {needed}")
        token_history = np.full((b, width), -1, dtype=np.int32)
        history_is_output = np.zeros((b, width), dtype=bool)
        for i in prompt_lens:
            lp, lo = prompt_lens[i], output_lens[i]
            if lp:
                token_history[i, :lp] = rows[i].prompt_token_ids
            if lo:
                token_history[i, lp : lp + lo] = rows[i].output_token_ids
                history_is_output[i, lp : lp + lo] = True
    else:
        token_history = np.full((b, 0), -1, dtype=np.int32)
        history_is_output = np.zeros((b, 0), dtype=bool)

    banned_lens = [len(r.banned_token_ids) for r in rows]
    needed = max(banned_lens, default=0)
    width = needed if banned_len is None else int(banned_len)
    if width < needed:
        raise ValueError(f"banned_len must be >= the longest banned_token_ids, got {width} < {needed}")
    banned = np.full((b, width), -1, dtype=np.int32)
    for i, count in enumerate(banned_lens):
        if count:
            banned[i, :count] = rows[i].banned_token_ids

    tensors = SamplingTensors(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        seeds=seeds,
        steps=steps,
        token_history=token_history,
        history_is_output=history_is_output,
        banned_token_ids=banned,
    )
    flags = SamplerFlags(
        all_greedy=all_greedy,
        use_penalties=use_penalties,
        use_filters=use_filters,
        num_logprobs=int(num_logprobs),
    )
    return tensors, flags
