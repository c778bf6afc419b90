"""Chained verification: speculation that keeps async scheduling's one-step lookahead.

A request whose verification (or plain decode) step N is still on the device can verify again in step N + 1,
dispatched before N's tokens reach the host. The host lays the request's row out as if N had accepted all of
its drafts: the row holds N's last emitted token (read on the device, like any pending token) and up to k
draft slots, at the positions that would follow, with pages allocated for that. On the device the row is then
made exact before anything reads it:

- N accepted a of its ``assumed`` drafts, so the row moves ``assumed - a`` positions back: its positions,
  KV slots (recomputed from its block table), context length, longrope lengths and sampling steps;
- n-gram: its drafts are looked up there (``ngram_device``) over the history the host knew plus N's emitted
  tokens; device drafters (early exit, draft model): the drafter's k steps are laid out the same way and
  moved back by the same amount before they run (``chain_proposal``), feeding N's last emitted token.

The host learns what happened when N reports (``Scheduler.attach_chained``). The attention metadata must be the
backend-neutral layout for this, as every backend's ``plan_short`` gives (``AttentionBackend.with_layout``); a
step with a chunk longer than k + 1 tokens (a prefill, whose metadata the work-items path plans on the host)
does not chain, and the request waits a step as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jserve.speculative.ngram_device import append_emitted, propose_on_device


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ChainInput:
    """A verification step's chained rows (S sampled rows, T tokens, B sequence rows; numpy on the host)."""

    src: jax.Array  # [S] i32: the row's sampled row in the previous step (-1: not chained)
    assumed: jax.Array  # [S] i32: drafts the previous step's row verified, all assumed accepted by the layout
    max_drafts: jax.Array  # [S] i32: draft slots the row holds
    # [S] i32: drafts the row could take after the host's known tokens (max_tokens, model length), less the
    # tokens the previous step emits for it: the limit a synchronous step would have had
    room: jax.Array
    # [S, W] i32: the request's tokens the host knew (prompt and outputs; n-gram only: device drafters, W = 1)
    history: jax.Array
    history_len: jax.Array  # [S] i32
    token_seq: jax.Array  # [T] i32: sequence row of each token of a chained row (-1: other tokens)
    seq_row: jax.Array  # [B] i32: sampled row of each chained sequence row (-1: other rows)
    # the previous step's verification outputs (the runner passes its device arrays; a plain previous step:
    # prev_verified False and these placeholders, each row having emitted one token)
    prev_verified: jax.Array  # [] bool
    prev_spec_tokens: jax.Array  # [S, J] i32
    prev_num_emitted: jax.Array  # [S] i32


def build_chain(
    chunks: Sequence,
    requests: dict,
    shapes,
    num_tokens_padded: int,
    previous_rows: dict[str, int] | None,
) -> ChainInput:
    """The chained rows of a verification step: chunks whose ``chain_assumed`` is >= 0."""
    s, b, width, j = shapes.spec_rows, shapes.max_num_seqs, shapes.chain_history_len, shapes.num_spec_tokens + 1
    src = np.full(s, -1, np.int32)
    assumed = np.zeros(s, np.int32)
    max_drafts = np.zeros(s, np.int32)
    room = np.zeros(s, np.int32)
    history = np.zeros((s, width), np.int32)
    history_len = np.zeros(s, np.int32)
    token_seq = np.full(num_tokens_padded, -1, np.int32)
    seq_row = np.full(b, -1, np.int32)
    cursor = row = 0
    for c, chunk in enumerate(chunks):
        n = len(chunk.token_ids)
        if chunk.chain_assumed >= 0:
            request = requests[chunk.request_id]
            known = request.num_tokens - request.num_pending_tokens
            src[row] = previous_rows[chunk.request_id]
            assumed[row] = chunk.chain_assumed
            max_drafts[row] = chunk.num_drafts
            room[row] = min(
                request.sampling_params.max_tokens - request.num_output_tokens - 1,
                shapes.history_len - known - 1,  # (history_len: max_model_len)
            )
            if shapes.spec_lookup:
                history[row, :known] = request.known_token_array()
                history_len[row] = known
            token_seq[cursor : cursor + n] = c
            seq_row[c] = row
        cursor += n
        row += int(chunk.sample)
    return ChainInput(
        src,
        assumed,
        max_drafts,
        room,
        history,
        history_len,
        token_seq,
        seq_row,
        prev_verified=np.asarray(False),
        prev_spec_tokens=np.zeros((s, j), np.int32),
        prev_num_emitted=np.ones(s, np.int32),
    )


def _shifts(chain: ChainInput) -> tuple[jax.Array, jax.Array]:
    """Per sampled row: positions to move back, and tokens the previous step emitted for it."""
    chained = chain.src >= 0
    prev = jnp.clip(chain.src, 0, chain.prev_num_emitted.shape[0] - 1)
    emitted = jnp.where(chain.prev_verified, chain.prev_num_emitted[prev], 1)
    shift = jnp.where(chained, jnp.maximum(chain.assumed + 1 - emitted, 0), 0)
    return shift, jnp.where(chained, emitted, 0)


def _limits(chain: ChainInput, emitted: jax.Array) -> jax.Array:
    """Drafts each chained row may verify: its slots, capped at what max_tokens and the model's length leave
    after the previous step's actual tokens (what a synchronous step would have allowed)."""
    return jnp.where(chain.src >= 0, jnp.clip(jnp.minimum(chain.max_drafts, chain.room - emitted), 0, None), 0)


def _looked_up(chain: ChainInput, emitted: jax.Array, prev_tokens: jax.Array, *, k: int, min_n: int, max_n: int):
    """Each chained row's n-gram drafts, looked up over its history plus the previous step's emitted tokens."""
    chained = chain.src >= 0
    prev = jnp.clip(chain.src, 0, chain.prev_spec_tokens.shape[0] - 1)
    accepted = jnp.where(chain.prev_verified, jnp.maximum(emitted - 1, 0), 0)
    history, length = append_emitted(chain.history, chain.history_len, chain.prev_spec_tokens[prev], accepted)
    last = prev_tokens[jnp.maximum(chain.src, 0)]
    history, length = append_emitted(history, length, last[:, None], chained.astype(jnp.int32))
    return propose_on_device(history, length, _limits(chain, emitted), k=k, min_n=min_n, max_n=max_n)


def _slots(pages: jax.Array, positions: jax.Array, page_size: int) -> jax.Array:
    """KV slots of ``positions`` on ``pages`` (the page holding each position)."""
    return pages * page_size + positions % page_size


def apply_chain(inputs, backend, *, page_size: int, lookup: tuple[int, int] | None):
    """The step's inputs with its chained rows made exact (see the module docstring). ``lookup``: n-gram's
    (min_n, max_n), whose drafts are looked up here; None: the device drafter's drafts are in ``inputs`` already
    (``chain_proposal`` ran them at the moved-back positions), and only their number is capped here."""
    spec = inputs.spec
    chain = spec.chain
    s, k = spec.draft_tokens.shape
    shift, emitted = _shifts(chain)
    chained = chain.src >= 0
    if lookup is None:
        spec = dataclasses.replace(spec, num_drafts=jnp.where(chained, _limits(chain, emitted), spec.num_drafts))
    else:
        drafts, counts = _looked_up(chain, emitted, inputs.prev_tokens, k=k, min_n=lookup[0], max_n=lookup[1])
        spec = dataclasses.replace(
            spec,
            draft_tokens=spec.draft_tokens.at[jnp.where(chained, spec.draft_rows, s)].set(drafts, mode="drop"),
            num_drafts=jnp.where(chained, counts, spec.num_drafts),
        )
    layout = backend.layout_of(inputs.attention)
    seq = chain.token_seq
    row = jnp.where(seq >= 0, chain.seq_row[jnp.maximum(seq, 0)], -1)
    token_shift = jnp.where(row >= 0, shift[jnp.maximum(row, 0)], 0)
    positions = inputs.positions - token_shift
    moved = _slots(layout.block_tables[jnp.maximum(seq, 0), positions // page_size], positions, page_size)
    slots = jnp.where(row >= 0, moved, layout.slot_mapping)
    seq_shift = jnp.where(chain.seq_row >= 0, shift[jnp.maximum(chain.seq_row, 0)], 0)
    layout = dataclasses.replace(layout, slot_mapping=slots, kv_lens=layout.kv_lens - seq_shift)
    sampling = inputs.sampling
    sampling = dataclasses.replace(sampling, steps=sampling.steps - shift)
    return dataclasses.replace(
        inputs,
        positions=positions,
        attention=backend.with_layout(inputs.attention, layout),
        rope_lens=inputs.rope_lens - token_shift,
        sampling=sampling,
        spec=spec,
    )


def for_drafter(chain: ChainInput | None) -> ChainInput | None:
    """What the drafting program reads of a step's chain: per-row fields only (``token_seq`` follows the
    verification's token bucket, where one drafting program serves every bucket)."""
    if chain is None:
        return None
    return dataclasses.replace(chain, token_seq=np.zeros(0, np.int32))


def chain_proposal(proposal, chain: ChainInput, prev_tokens: jax.Array, sampling, backend, *, page_size: int):
    """The device drafter's inputs (``ProposalInput``, stacked per-step metadata) and the step's sampling
    tensors with each chained row moved back as ``apply_chain`` moves its verification row: the drafter
    feeds the previous step's last emitted token at the moved-back position, its k steps' KV slots and context
    lengths follow, and its sampling steps (the keys of seeded draws) match a synchronous step's."""
    shift, _ = _shifts(chain)
    rows = proposal.verify_rows  # drafting row -> sampled row
    layout = backend.layout_of(proposal.attention)  # fields stacked over the k steps: [k, ...]
    k = layout.slot_mapping.shape[0]
    drafting = jnp.arange(rows.shape[0]) < layout.num_seqs[0, 0]
    chained = drafting & (chain.src[rows] >= 0)
    row_shift = jnp.where(chained, shift[rows], 0)
    positions = proposal.positions - row_shift
    step_positions = positions[None, :] + jnp.arange(k)[:, None]  # [k, S]
    live = chained[None, :] & (jnp.arange(k)[:, None] < chain.max_drafts[rows][None, :])
    tables = layout.block_tables[:, : rows.shape[0]]
    pages = jnp.take_along_axis(tables, (step_positions // page_size)[..., None], axis=-1)[..., 0]
    slots = jnp.where(live, _slots(pages, step_positions, page_size), layout.slot_mapping)
    seq_shift = jnp.zeros(layout.kv_lens.shape[1], jnp.int32).at[: rows.shape[0]].set(row_shift)
    layout = dataclasses.replace(layout, slot_mapping=slots, kv_lens=layout.kv_lens - seq_shift[None, :])
    tokens = jnp.where(chained, prev_tokens[jnp.maximum(chain.src[rows], 0)], proposal.tokens)
    proposal = dataclasses.replace(
        proposal, tokens=tokens, positions=positions, attention=backend.with_layout(proposal.attention, layout)
    )
    return proposal, dataclasses.replace(sampling, steps=sampling.steps - shift)
