"""Device-side drafting (early exit and draft models): k autoregressive draft steps in one dispatch.

The drafter is any module with ``embed`` / ``run_layers`` / ``final_norm`` / ``logits``: a separate draft model
over its own KV pages, or the target itself over its first m layers (self-speculative early exit, LayerSkip).
Each speculating row feeds its last token at its next position; step i writes that token's K/V into the
drafter's pages and samples draft i + 1 from the drafter's distribution q_i (the row's temperature, top-k,
top-p and min-p; argmax for greedy rows), which verification needs to stay lossless. The k steps read
per-step attention metadata planned on the host (stacked on a leading axis), one program for every step.

The drafter's K/V for a verified token is rewritten by the next target step anyway (early exit: the target's
own layers; draft model: the step mirrors every token through the draft), so rejected drafts leave nothing
behind that a later step reads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jserve.engine.sampler import SamplingTensors, _row_keys, categorical, filtered_logits

_DRAFT_STREAM = 0xD4AF  # fold_in tag of the drafter's draws (independent of the target's keys)


def drafting_tensors(t: SamplingTensors) -> SamplingTensors:
    """The drafter samples with the row's temperature and filters, without penalties, banned ids or grammar
    masks (any q keeps verification lossless; these keep q close to the target's p, and a verification step's
    masks are per verified position, computed on the host from these very drafts)."""
    return dataclasses.replace(
        t,
        repetition_penalty=jnp.ones_like(t.repetition_penalty),
        presence_penalty=jnp.zeros_like(t.presence_penalty),
        frequency_penalty=jnp.zeros_like(t.frequency_penalty),
        banned_token_ids=t.banned_token_ids[:, :0],
        token_history=t.token_history[:, :0],
        history_is_output=t.history_is_output[:, :0],
        token_bitmask=t.token_bitmask[:, :0],
    )


def draft_tokens(
    model,
    layers: range,
    kv_cache: tuple,
    tokens: jax.Array,  # [S] last token of each drafting row (padding rows: anything)
    positions: jax.Array,  # [S] its position
    metadata,  # the backend's metadata for each of the k steps, stacked on a leading axis
    backend,
    tensors: SamplingTensors,  # [S] rows (drafting_tensors)
    *,
    kv_layers: range | None = None,
    stacked=None,
) -> tuple[tuple, jax.Array, jax.Array]:
    """Returns the drafter's updated pages, drafts [S, k] and their distributions q [S, k, V]. ``kv_layers``: the
    layers ``kv_cache`` holds (early exit: the target's), ``stacked``: the drafter's stacked layers, if any
    (``CausalLM.run_layers``)."""
    greedy_rows = tensors.temperature <= 0

    def step(carry, meta):
        tok, pos, kv, i = carry
        x = model.embed(tok)
        x, kv = model.run_layers(x, pos, kv, meta, backend, layers, kv_layers=kv_layers, stacked=stacked)
        logits = model.logits(model.final_norm(x)).astype(jnp.float32)
        row_tensors = dataclasses.replace(tensors, steps=tensors.steps + i)
        x_filtered = filtered_logits(logits, row_tensors)
        keys = jax.vmap(lambda key: jax.random.fold_in(key, _DRAFT_STREAM))(
            _row_keys(row_tensors.seeds, row_tensors.steps)
        )
        drawn = categorical(keys, x_filtered)
        draft = jnp.where(greedy_rows, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)
        q = jax.nn.softmax(x_filtered, axis=-1)
        return (draft, pos + 1, kv, i + 1), (draft, q)

    # NOTE: unrolled, not a lax.scan: XLA:CPU copied the pages carried through the scan's loop on every step
    # (the whole pool, ~35 MB a layer at default settings), where straight-line updates of the donated pages
    # happen in place.
    carry = (tokens, positions, kv_cache, jnp.int32(0))
    drafts, probs = [], []
    for i in range(jax.tree.leaves(metadata)[0].shape[0]):
        carry, (draft, q) = step(carry, jax.tree.map(lambda a, i=i: a[i], metadata))
        drafts.append(draft)
        probs.append(q)
    return carry[2], jnp.stack(drafts, axis=1), jnp.stack(probs, axis=1)
