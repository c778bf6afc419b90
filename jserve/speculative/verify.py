"""Verification of drafted tokens inside the engine's step, on the device: greedy or lossless rejection sampling.

A speculating row s of a step holds its last token and ``num_drafts[s]`` drafts d_1..d_n as consecutive query
tokens; the target's logits at those n + 1 positions are position j's distribution p_j over the token after
d_j (p_0: after the last token). Every sampled row of such a step is laid out as J = k + 1 positions, rows that
did not draft using position 0 only, so one program serves any mix.

- Greedy rows (temperature 0): d_{j+1} is accepted while it equals argmax p_j; the first mismatch is replaced
  by that argmax. The output is token for token what plain greedy decoding gives.
- Sampled rows: d_{j+1} is accepted with probability min(1, p_j(d) / q_j(d)), q_j being the distribution the
  draft was sampled from (one-hot for n-gram drafts); the first rejected position draws from the residual
  norm(max(0, p_j - q_j)), and when all n drafts pass, a bonus token is drawn from p_n (Leviathan et al. 2023,
  Chen et al. 2023). Each emitted token is then distributed exactly as the target's sampler would draw it.

p_j is the sampler's own distribution: banned ids, penalties (over the history plus the drafts before j),
temperature, top-k, top-p and min-p, from ``jserve.engine.sampler``. The draw at position j uses the key the
plain sampler would use for that token (seed, step + j), so a row with no drafts samples exactly as it would in
a plain step; acceptance tests use a key derived from it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jserve.engine.sampler import (
    SamplingTensors,
    _maybe_filter,
    _row_keys,
    _scale,
    categorical,
    greedy_ids,
    process_logits,
    switches,
    top_logprobs,
)

_NEG_INF = float("-inf")
_ACCEPT_STREAM = 0x5EC0  # fold_in tag of the acceptance uniforms (the draws use the sampler's own key)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecInput:
    """The verification layout of one step: S sampled rows x J = k + 1 positions (numpy on the host)."""

    verify_indices: jax.Array  # [S, J] i32: token row of position j of sampled row s (padding: 0)
    # [S, k] i32 drafts in drafting order (row r: the r-th sampled row that drafts): the host's (n-gram), or
    # the device drafter's output, which the runner passes in their place
    draft_tokens: jax.Array
    num_drafts: jax.Array  # [S] i32: drafts of sampled row s (0: it samples one token, as in a plain step)
    draft_token_index: jax.Array  # [S, k] i32: the token row draft i of sampled row s occupies (T: none)
    draft_rows: jax.Array  # [S] i32: drafting-order row of sampled row s's drafts
    history_base: jax.Array  # [S] i32: penalty-history column where row s's drafts go (its token count)
    draft_probs: jax.Array | None = None  # [S, k, V] f32 drafting order: q of device drafts (n-gram: None)
    chain: object | None = None  # under async scheduling: the chained rows (jserve.speculative.chain)

    def drafts_by_row(self) -> tuple[jax.Array, jax.Array | None]:
        """Drafts [S, k] (and q [S, k, V]) reordered to sampled rows."""
        probs = None if self.draft_probs is None else self.draft_probs[self.draft_rows]
        return self.draft_tokens[self.draft_rows], probs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecOutput:
    token_ids: jax.Array  # [S, J] i32: accepted drafts, then the target's own token; num_emitted[s] valid
    num_emitted: jax.Array  # [S] i32: accepted drafts + 1
    logprobs: jax.Array  # [S, J] f32: the target's raw-logit logprob of each emitted token
    top_ids: jax.Array  # [S, J, L] i32
    top_logprobs: jax.Array  # [S, J, L] f32
    num_drafts: jax.Array  # [S] i32: drafts each row verified (chained rows: those looked up on the device)


def expand_rows(
    t: SamplingTensors, drafts: jax.Array, num_drafts: jax.Array, history_base: jax.Array
) -> SamplingTensors:
    """[S] rows -> [S * J] rows, one per verified position: position j samples step + j, and its penalty history
    holds the row's history plus drafts d_1..d_j as output tokens."""
    s, k = drafts.shape
    j = k + 1
    # the grammar bitmask already has one row per position (the host computes each after the drafts before it)
    rep = jax.tree.map(lambda a: jnp.repeat(a, j, axis=0), dataclasses.replace(t, token_bitmask=t.token_bitmask[:0]))
    rep = dataclasses.replace(rep, token_bitmask=t.token_bitmask)
    position = jnp.tile(jnp.arange(j, dtype=jnp.int32), s)
    rep = dataclasses.replace(rep, steps=rep.steps + position)
    width = t.token_history.shape[1]
    if width == 0:
        return rep
    i = jnp.arange(k, dtype=jnp.int32)
    # draft i of row s is in the history of positions j > i, at column history_base[s] + i
    cols = history_base[:, None, None] + i[None, None, :]  # [S, 1, k]
    valid = (i[None, None, :] < jnp.arange(j)[None, :, None]) & (i[None, None, :] < num_drafts[:, None, None])
    cols = jnp.where(valid & (cols < width), cols, width).reshape(s * j, k)  # width: dropped
    rows = jnp.arange(s * j, dtype=jnp.int32)[:, None]
    values = jnp.broadcast_to(drafts[:, None, :], (s, j, k)).reshape(s * j, k)
    return dataclasses.replace(
        rep,
        token_history=rep.token_history.at[rows, cols].set(values, mode="drop"),
        history_is_output=rep.history_is_output.at[rows, cols].set(True, mode="drop"),
    )


def _sampled_path(x, drafts, num_drafts, draft_probs, keys):
    """Acceptance flags [S, k] and the per-position draws [S, J] of sampled rows (rejection sampling)."""
    s, k = drafts.shape
    j = k + 1
    vocab = x.shape[-1]
    logp = jax.nn.log_softmax(x, axis=-1).reshape(s, j, vocab)  # the target's p_j (filtered entries: -inf)
    p_d = jnp.exp(jnp.take_along_axis(logp[:, :k], drafts[..., None], axis=-1)[..., 0])
    one_hot = jax.nn.one_hot(drafts, vocab, dtype=jnp.float32)
    q = one_hot if draft_probs is None else draft_probs  # [S, k, V]
    q_d = jnp.sum(q * one_hot, axis=-1)
    uniforms = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _ACCEPT_STREAM)))(keys)
    accept = uniforms.reshape(s, j)[:, :k] * q_d < p_d  # u < p/q without dividing by a tiny q
    residual = jnp.maximum(jnp.exp(logp[:, :k]) - q, 0.0)
    residual_logits = jnp.where(residual > 0, jnp.log(jnp.where(residual > 0, residual, 1.0)), _NEG_INF)
    empty = jnp.all(residual <= 0, axis=-1, keepdims=True)  # p == q: a rejection cannot happen; keep p
    residual_logits = jnp.where(empty, logp[:, :k], residual_logits)
    position = jnp.arange(j)[None, :, None]
    final = jnp.where(
        position < num_drafts[:, None, None],
        jnp.pad(residual_logits, ((0, 0), (0, 1), (0, 0)), constant_values=_NEG_INF),
        x.reshape(s, j, vocab),
    ).reshape(s * j, vocab)
    draws = categorical(keys, final)
    return accept, draws.reshape(s, j)


def verify(
    logits: jax.Array,
    tensors: SamplingTensors,
    drafts: jax.Array,
    num_drafts: jax.Array,
    draft_probs: jax.Array | None,
    max_logprobs: int,
) -> SpecOutput:
    """``logits`` [S * J, V] at the verified positions, ``tensors`` their expanded rows (``expand_rows``),
    ``drafts`` [S, k], ``draft_probs`` [S, k, V] (None: one-hot drafts). See the module docstring."""
    s, k = drafts.shape
    j = k + 1
    on = switches(tensors)
    raw = logits.astype(jnp.float32)
    processed = process_logits(raw, tensors)
    greedy = greedy_ids(processed).reshape(s, j)
    temperature = tensors.temperature.reshape(s, j)[:, 0]

    def sampled(processed):
        x = _maybe_filter(_scale(processed, tensors.temperature), tensors, on.use_filters)
        return _sampled_path(x, drafts, num_drafts, draft_probs, _row_keys(tensors.seeds, tensors.steps))

    def greedy_only(processed):
        return jnp.zeros((s, k), bool), greedy

    accept_sampled, draws = jax.lax.cond(on.any_sampled, sampled, greedy_only, processed)
    is_sampled = (temperature > 0)[:, None]
    accept = jnp.where(is_sampled, accept_sampled, drafts == greedy[:, :k])
    accept &= jnp.arange(k)[None, :] < num_drafts[:, None]
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
    own = jnp.where(is_sampled, draws, greedy)  # the target's token at each position
    correction = jnp.take_along_axis(own, num_accepted[:, None], axis=1)[:, 0]
    position = jnp.arange(j)[None, :]
    padded_drafts = jnp.pad(drafts, ((0, 0), (0, 1)))
    token_ids = jnp.where(position < num_accepted[:, None], padded_drafts, 0)
    token_ids = jnp.where(position == num_accepted[:, None], correction[:, None], token_ids)
    logprobs_all = jax.nn.log_softmax(raw, axis=-1)
    chosen = jnp.take_along_axis(logprobs_all, token_ids.reshape(-1, 1), axis=-1).reshape(s, j)
    top_ids, top_lp = top_logprobs(logprobs_all, on.any_logprobs, int(max_logprobs))
    return SpecOutput(
        token_ids=token_ids,
        num_emitted=num_accepted + 1,
        logprobs=chosen,
        top_ids=top_ids.reshape(s, j, -1),
        top_logprobs=top_lp.reshape(s, j, -1),
        num_drafts=num_drafts,
    )
