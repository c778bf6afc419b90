"""SchedulerOutput -> padded numpy StepInput whose shapes depend on the token bucket alone.

Layout of one step (T tokens, B = max_num_seqs sequence rows, Pmax = pages per sequence at max_model_len):
```
tokens    [T]  t0 t1 t2 t3 | t4 | t5 t6 | pad pad ...     row i owns tokens cu_q_lens[i]:cu_q_lens[i+1]
positions [T]  p  p+1 ...                                  padding tokens: position 0, slot 0 (null page)
block_tables [B, Pmax], kv_lens [B], cu_q_lens [B+1]       padding rows: 0 pages, 0 tokens
logits_indices [R]   last token of each sampled row (others point at token 0 and are ignored);
                     R = min(T, B) sampled rows (a verification step: B, its rows are spec_rows)
prompt_targets [T]   next prompt token of each prompt-logprob token, -1 elsewhere
rope_lens [T]        the sequence length longrope (Phi-3) picks its factors by: max(prompt length, position + 1)
token_src [T]        async scheduling: row of the previous step's sampled ids that fills a pending token, or -1
sampling             [R] settings, [R, max_model_len] penalty history, [R, Nb] banned ids (Nb fixed),
                     [R, W] grammar bitmask (structured outputs; verification steps: one row per position)
prev_tokens [B]      the previous step's sampled ids (padded to B whatever its R)
lora_slots [T]       multi-LoRA: each token's adapter slot (0: the base model; padding: 0); None without LoRA
```
Only T varies (a power-of-two bucket), so an engine has one program per bucket. Three builders fill the
parts: ``build_layout`` (tokens, positions, the attention layout), ``build_sampling`` (sampled rows) and
``build_prompt_logprobs`` (prompt-logprob rows); ``build_step`` joins them. Nothing here knows the attention
backend: the runner turns the layout into its backend's metadata when it dispatches the step.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from jserve.attention import AttentionLayout
from jserve.engine.request import PENDING_TOKEN, Request
from jserve.engine.sampler import RowSpec, SamplingTensors, make_sampling_tensors
from jserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from jserve.engine.shapes import StepShapes, round_up
from jserve.speculative.chain import build_chain
from jserve.speculative.verify import SpecInput
from jserve.structured.matcher import fill_bitmask_rows


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInput:
    """Everything the jitted step reads, as arrays (a pytree)."""

    tokens: jax.Array  # [T] i32
    positions: jax.Array  # [T] i32
    # the step's AttentionLayout as built; at dispatch the runner replaces it with its backend's plan of it
    attention: object
    logits_indices: jax.Array  # [B] i32
    sampling: SamplingTensors
    prompt_targets: jax.Array  # [T] i32 next prompt token per row (-1: none)
    # [T] i32 max(prompt length, position + 1): longrope's (Phi-3) sequence length, which must not depend on how
    # the prompt is chunked or batched (transformers: the prompt's length while prefilling, position + 1 after)
    rope_lens: jax.Array
    # Async scheduling: a pending token (sampled by the previous step, not on the host yet) is read on the device
    # from that step's sampled ids. token_src [T] / history_src [B]: row of prev_tokens to read, -1 = none;
    # history_col [B]: the pending token's column in sampling.token_history.
    token_src: jax.Array
    history_src: jax.Array
    history_col: jax.Array
    prev_tokens: jax.Array  # [B] i32: the previous step's sampled ids (the runner passes its device array)
    spec: SpecInput | None = None  # a verification step's layout (speculative decoding); None: a plain step
    # [] bool: the step also runs its tokens through the draft model (draft-model speculation, while the
    # engine speculates; off above the policy's batch size, where it would only cost time)
    run_draft: jax.Array = dataclasses.field(default_factory=lambda: np.asarray(True))
    # [] bool: structured outputs under async scheduling: a constrained row's mask needs its pending token, so
    # the step only computes its logits and a separate sampling program samples them once the host has the
    # masks (``ModelRunner.sample_deferred``)
    defer_sampling: jax.Array = dataclasses.field(default_factory=lambda: np.asarray(False))
    lora_slots: jax.Array | None = None  # [T] i32 each token's adapter slot (multi-LoRA engines only)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ProposalInput:
    """What the device drafter (early exit, draft model) reads: one token per drafting row, k steps."""

    tokens: jax.Array  # [S] i32 last token of each drafting row
    positions: jax.Array  # [S] i32 its position
    attention: object  # k AttentionLayouts (the runner plans each and stacks them)
    verify_rows: jax.Array  # [S] i32 the sampled row (verification row) of each drafting row


@dataclass(frozen=True)
class PromptLogprobRows:
    """Rows [start, start + count) of the step hold prompt positions first_position.. of request_id."""

    request_id: str
    start: int
    count: int
    first_position: int


@dataclass
class StepPlan:
    """A built step: device inputs plus the host bookkeeping needed to read its outputs."""

    inputs: StepInput
    sampled_ids: list[str]  # request id of sample row i (rows past the list are padding)
    prompt_rows: list[PromptLogprobRows]
    num_tokens: int
    uses_penalties: bool  # else the runner swaps in its resident all-padding history
    wants_top_logprobs: bool  # some sampled row asked for logprobs: copy the top-k arrays to the host
    uses_grammar: bool = False  # some row is constrained (structured outputs); else the resident all-ones mask
    reads_previous: bool = False  # some token or history entry comes from the previous step's outputs
    proposal: ProposalInput | None = None  # device-drafted speculation: the drafter's inputs
    num_drafts: list[int] = dataclasses.field(default_factory=list)  # per sampled row (verification steps)
    # device-drafted steps with constrained rows: fills their later positions' masks from the drafts
    fill_draft_masks: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    @property
    def bucket(self) -> int:
        return int(self.inputs.tokens.shape[0])

    @property
    def is_verification(self) -> bool:
        return self.inputs.spec is not None

    @property
    def defers_sampling(self) -> bool:
        return bool(self.inputs.defer_sampling)


def build_layout(
    chunks: Sequence[ScheduledChunk],
    shapes: StepShapes,
    num_tokens_padded: int,
    previous_rows: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, AttentionLayout]:
    """Tokens, where pending tokens come from (``previous_rows``: request id -> its sampled row in the
    previous step), positions and the backend-neutral attention layout of the scheduled chunks.

    Whole-array numpy over the step's flattened tokens and page tables: a Python loop per chunk cost ~6 us a
    sequence, which at hundreds of sequences is host time an accelerator's step waits for."""
    t, b, page_size = num_tokens_padded, shapes.max_num_seqs, shapes.page_size
    c = len(chunks)
    lengths = np.fromiter((len(chunk.token_ids) for chunk in chunks), np.int32, c)
    starts = np.fromiter((chunk.start_pos for chunk in chunks), np.int32, c)
    ends = np.cumsum(lengths, dtype=np.int32)
    n = int(ends[-1]) if c else 0
    seq_of_token = np.repeat(np.arange(c, dtype=np.int32), lengths)
    pos = starts[seq_of_token] + np.arange(n, dtype=np.int32) - (ends - lengths)[seq_of_token]
    block_tables = np.zeros((b, shapes.max_pages_per_seq), np.int32)
    table_lens = np.fromiter((len(chunk.block_table) for chunk in chunks), np.int32, c)
    seq_of_page = np.repeat(np.arange(c, dtype=np.int32), table_lens)
    page_col = np.arange(len(seq_of_page), dtype=np.int32) - (np.cumsum(table_lens) - table_lens)[seq_of_page]
    block_tables[seq_of_page, page_col] = list(itertools.chain.from_iterable(ch.block_table for ch in chunks))
    tokens = np.zeros(t, np.int32)
    tokens[:n] = list(itertools.chain.from_iterable(chunk.token_ids for chunk in chunks))
    token_src = np.full(t, -1, np.int32)
    last = ends - 1
    # a decode chunk's last token can be pending, and a chained verification's first (its drafts follow it)
    edge = np.where(tokens[last] == PENDING_TOKEN, last, ends - lengths)
    pending = np.flatnonzero(tokens[edge] == PENDING_TOKEN)
    if len(pending):
        token_src[edge[pending]] = [previous_rows[chunks[i].request_id] for i in pending]
        tokens[edge[pending]] = 0
    positions = np.zeros(t, np.int32)
    positions[:n] = pos
    slots = np.zeros(t, np.int32)
    slots[:n] = block_tables[seq_of_token, pos // page_size] * page_size + pos % page_size
    kv_lens = np.zeros(b, np.int32)
    kv_lens[:c] = starts + lengths
    cu_q_lens = np.full(b + 1, n, np.int32)
    cu_q_lens[:c] = ends - lengths
    layout = AttentionLayout(
        slot_mapping=slots,
        kv_lens=kv_lens,
        block_tables=block_tables,
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([c], np.int32),
    )
    return tokens, token_src, positions, layout


def build_sampling(
    chunks: Sequence[ScheduledChunk],
    requests: dict[str, Request],
    shapes: StepShapes,
    seed_of: Callable[[Request], int],
    banned_ids_of: Callable[[Request], Sequence[int]],
    previous_rows: dict[str, int] | None = None,
    num_rows: int | None = None,
    verifying: bool = False,
    device_drafts: bool = False,
    defer_masks: bool = False,
) -> tuple[SamplingTensors, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Sampling settings of the chunks that sample, their logits rows, their request ids (row order), and for
    each row where its pending token goes in the penalty history (source row in the previous step, column).
    ``num_rows``: the sampled rows' padding (plain steps: ``shapes.sample_rows`` of the bucket; verification
    steps: spec_rows, their logits_indices keep max_num_seqs rows).
    Constrained rows (structured outputs) get their grammar's bitmask; ``verifying``: one per verified position,
    each after the drafts before it (``device_drafts``: position 0 only; ``draft_mask_filler`` does the rest once
    the device drafter's tokens are known). ``defer_masks``: the masks are filled later, when the step's
    sampling is dispatched (``fill_deferred_masks``)."""
    num_rows = shapes.max_num_seqs if num_rows is None else num_rows
    logits_indices = np.zeros(shapes.max_num_seqs if verifying else num_rows, np.int32)
    history_src = np.full(num_rows, -1, np.int32)
    history_col = np.zeros(num_rows, np.int32)
    rows: list[RowSpec] = []
    sampled_ids: list[str] = []
    sampled: list[tuple[ScheduledChunk, Request]] = []
    cursor = 0
    for chunk in chunks:
        cursor += len(chunk.token_ids)
        if not chunk.sample:
            continue
        request = requests[chunk.request_id]
        sampled.append((chunk, request))
        row = len(sampled_ids)
        logits_indices[row] = cursor - 1
        if request.num_pending_tokens:
            history_src[row] = previous_rows[chunk.request_id]
            history_col[row] = request.num_prompt_tokens + request.num_output_tokens
        sampled_ids.append(chunk.request_id)
        rows.append(_row_spec(chunk, request, seed_of, banned_ids_of))
    positions = shapes.num_spec_tokens + 1 if verifying else 1
    sampling = make_sampling_tensors(
        rows,
        pad_to=num_rows,
        history_len=shapes.history_len,
        banned_len=shapes.banned_len,
        bitmask_words=shapes.bitmask_words,
        positions_per_row=positions,
    )
    if not defer_masks:
        constrained = _constrained_rows(sampled, positions, device_drafts)
        if constrained:
            fill_bitmask_rows(constrained, sampling.token_bitmask)
    return sampling, logits_indices, sampled_ids, history_src, history_col


def _row_spec(
    chunk: ScheduledChunk,
    request: Request,
    seed_of: Callable[[Request], int],
    banned_ids_of: Callable[[Request], Sequence[int]],
) -> RowSpec:
    """One sampled row's settings. A chained row follows a verification still on the device: it samples after
    that row's tokens, all assumed accepted (the device moves the step back by those it rejected)."""
    in_flight = chunk.chain_assumed + 1 if chunk.chain_assumed >= 0 and request.awaiting_verification else 0
    return RowSpec(
        params=request.sampling_params,
        seed=seed_of(request),
        step=request.num_sampled + in_flight,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=request.output_token_ids,
        banned_token_ids=banned_ids_of(request),
    )


def _constrained_rows(
    sampled: list[tuple[ScheduledChunk, Request]], positions: int, device_drafts: bool
) -> list[tuple[object, int, Sequence[int]]]:
    """(grammar, first bitmask row, drafts) of each constrained row: its masks start at row * positions, one
    per verified position after the drafts before it (none known yet when the device drafts them)."""
    return [
        (
            request.grammar,
            row * positions,
            [] if device_drafts else chunk.token_ids[len(chunk.token_ids) - chunk.num_drafts :],
        )
        for row, (chunk, request) in enumerate(sampled)
        if request.grammar is not None
    ]


def build_prompt_logprobs(
    chunks: Sequence[ScheduledChunk], requests: dict[str, Request], num_tokens_padded: int
) -> tuple[np.ndarray, list[PromptLogprobRows]]:
    """Per token row, the next prompt token whose logprob is wanted (-1: none), and which rows are whose."""
    targets = np.full(num_tokens_padded, -1, np.int32)
    prompt_rows: list[PromptLogprobRows] = []
    cursor = 0
    for chunk in chunks:
        n = len(chunk.token_ids)
        if chunk.prompt_logprobs:
            prompt = np.asarray(requests[chunk.request_id].prompt_token_ids)
            in_prompt = max(0, min(n, len(prompt) - chunk.start_pos))
            nxt = np.arange(chunk.start_pos, chunk.start_pos + in_prompt) + 1
            targets[cursor : cursor + in_prompt] = np.where(
                nxt < len(prompt), prompt[np.minimum(nxt, len(prompt) - 1)], -1
            )
            prompt_rows.append(PromptLogprobRows(chunk.request_id, cursor, in_prompt, chunk.start_pos))
        cursor += n
    return targets, prompt_rows


def build_rope_lens(
    chunks: Sequence[ScheduledChunk], requests: dict[str, Request], positions: np.ndarray
) -> np.ndarray:
    """[T] each token's longrope sequence length, max(its request's prompt length, position + 1); padding: 0."""
    lengths = [len(c.token_ids) for c in chunks]
    n = sum(lengths)
    prompt_lens = np.repeat([requests[c.request_id].num_prompt_tokens for c in chunks], lengths)
    rope_lens = np.zeros_like(positions)
    rope_lens[:n] = np.maximum(positions[:n] + 1, prompt_lens)
    return rope_lens


def build_lora_slots(chunks: Sequence[ScheduledChunk], requests: dict[str, Request], num_tokens_padded: int):
    """[T] each token's adapter slot (its request's ``lora_slot``), in the layout's token order."""
    slots = np.zeros(num_tokens_padded, np.int32)
    cursor = 0
    for chunk in chunks:
        n = len(chunk.token_ids)
        slots[cursor : cursor + n] = requests[chunk.request_id].lora_slot
        cursor += n
    return slots


def build_step(
    out: SchedulerOutput,
    requests: dict[str, Request],
    shapes: StepShapes,
    seed_of: Callable[[Request], int],
    banned_ids_of: Callable[[Request], Sequence[int]],
    previous_rows: dict[str, int] | None = None,
    device_drafts: bool = False,
    run_draft: bool = True,
    defer_grammar: bool = False,
) -> StepPlan:
    """Packs one SchedulerOutput into padded numpy arrays (see the module docstring for the layout).
    ``previous_rows``: async scheduling's request id -> sampled row of the step still on the device.
    A step with drafts (speculative decoding) becomes a verification step; ``device_drafts``: the drafts are
    placeholders that the device drafter fills (``ProposalInput``). ``defer_grammar``: a plain step with a
    constrained row whose last token is still pending defers its sampling (``StepInput.defer_sampling``)."""
    chunks = out.chunks
    num_tokens = sum(len(c.token_ids) for c in chunks)
    verifying = any(c.num_drafts for c in chunks)
    defer = defer_grammar and not verifying and _awaits_pending_grammar(chunks, requests)
    if verifying:
        t_pad = shapes.verify_bucket(num_tokens, sum(1 for c in chunks if c.sample))
        if t_pad is None:
            raise ValueError(f"a verification step of {num_tokens} tokens fits no verification program")
    else:
        t_pad = round_up(num_tokens, shapes.token_buckets)
    tokens, token_src, positions, layout = build_layout(chunks, shapes, t_pad, previous_rows)
    sampling, logits_indices, sampled_ids, history_src, history_col = build_sampling(
        chunks,
        requests,
        shapes,
        seed_of,
        banned_ids_of,
        previous_rows,
        shapes.spec_rows if verifying else shapes.sample_rows(t_pad),
        verifying,
        device_drafts,
        defer,
    )
    spec = build_verification(chunks, shapes, t_pad, requests, previous_rows) if verifying else None
    proposal = build_proposal(chunks, shapes) if verifying and device_drafts else None
    prompt_targets, prompt_rows = build_prompt_logprobs(chunks, requests, t_pad)
    n = len(sampled_ids)
    inputs = StepInput(
        tokens=tokens,
        positions=positions,
        attention=layout,
        logits_indices=logits_indices,
        sampling=sampling,
        prompt_targets=prompt_targets,
        rope_lens=build_rope_lens(chunks, requests, positions),
        token_src=token_src,
        history_src=history_src,
        history_col=history_col,
        prev_tokens=_no_previous(shapes.max_num_seqs),
        spec=spec,
        run_draft=np.asarray(run_draft),
        defer_sampling=np.asarray(defer),
        lora_slots=build_lora_slots(chunks, requests, t_pad) if shapes.lora else None,
    )
    return StepPlan(
        inputs,
        sampled_ids,
        prompt_rows,
        num_tokens,
        uses_penalties=bool(
            (
                (sampling.repetition_penalty[:n] != 1.0)
                | (sampling.presence_penalty[:n] != 0.0)
                | (sampling.frequency_penalty[:n] != 0.0)
            ).any()
        ),
        wants_top_logprobs=bool((sampling.num_logprobs[:n] > 0).any()),
        uses_grammar=defer or bool((sampling.token_bitmask != -1).any()),
        reads_previous=bool((token_src >= 0).any() or (history_src >= 0).any()),
        proposal=proposal,
        num_drafts=[c.num_drafts for c in chunks if c.sample] if verifying else [],
        fill_draft_masks=draft_mask_filler(chunks, requests, shapes, spec) if proposal is not None else None,
    )


def _awaits_pending_grammar(chunks: Sequence[ScheduledChunk], requests: dict[str, Request]) -> bool:
    """Some sampled row is constrained and its last token is still on the device."""
    return any(
        c.sample and requests[c.request_id].grammar is not None and requests[c.request_id].num_pending_tokens
        for c in chunks
    )


def fill_deferred_masks(plan: StepPlan, requests: dict[str, Request]) -> np.ndarray:
    """A deferred step's bitmask, once every pending token has reached its grammar: each constrained row's mask
    from its grammar's state now; rows of requests that ended meanwhile stay all ones (their token is
    discarded)."""
    mask = np.full(np.shape(plan.inputs.sampling.token_bitmask), -1, np.int32)
    rows = [
        (request.grammar, row, [])
        for row, rid in enumerate(plan.sampled_ids)
        if (request := requests.get(rid)) is not None and request.grammar is not None and not request.is_finished
    ]
    if rows:
        fill_bitmask_rows(rows, mask)
    return mask


def draft_mask_filler(
    chunks: Sequence[ScheduledChunk], requests: dict[str, Request], shapes: StepShapes, spec: SpecInput
) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """Device-drafted verification with constrained rows: a host function from (bitmask, the drafter's tokens
    [S, k] in drafting order, placed as ``spec.draft_rows`` says) to the bitmask with each constrained row's
    verified positions filled, each after the drafts before it. The drafts reach the host between drafting and
    verifying (one sync); None when no drafting row is constrained."""
    positions = shapes.num_spec_tokens + 1
    sampled = [requests[c.request_id] for c in chunks if c.sample]
    rows = [
        (request.grammar, row * positions, int(spec.draft_rows[row]), int(spec.num_drafts[row]))
        for row, request in enumerate(sampled)
        if request.grammar is not None and spec.num_drafts[row]
    ]
    if not rows:
        return None

    def fill(bitmask: np.ndarray, drafts: np.ndarray) -> np.ndarray:
        out = np.array(bitmask, copy=True)
        fill_bitmask_rows([(g, base, drafts[r, :d].tolist()) for g, base, r, d in rows], out)
        return out

    return fill


def build_verification(
    chunks: Sequence[ScheduledChunk],
    shapes: StepShapes,
    num_tokens_padded: int,
    requests: dict[str, Request] | None = None,
    previous_rows: dict[str, int] | None = None,
) -> SpecInput:
    """Where each sampled row's verified positions and drafts sit in the step (see ``jserve.speculative.verify``),
    and its chained rows (``shapes.spec_chain``: engines that speculate under async scheduling)."""
    s, k = shapes.spec_rows, shapes.num_spec_tokens
    verify_indices = np.zeros((s, k + 1), np.int32)
    draft_tokens = np.zeros((s, k), np.int32)
    num_drafts = np.zeros(s, np.int32)
    draft_token_index = np.full((s, k), num_tokens_padded, np.int32)
    draft_rows = np.zeros(s, np.int32)
    history_base = np.zeros(s, np.int32)
    cursor = row = drafting = 0
    for chunk in chunks:
        n = len(chunk.token_ids)
        cursor += n
        if not chunk.sample:
            continue
        d = chunk.num_drafts
        last = cursor - 1 - d  # the row's last known token
        verify_indices[row, : d + 1] = last + np.arange(d + 1)
        if d:  # drafts are stored in drafting order, as the device drafter returns them
            draft_tokens[drafting, :d] = chunk.token_ids[-d:]
            draft_token_index[row, :d] = last + 1 + np.arange(d)
            draft_rows[row] = drafting
            drafting += 1
        num_drafts[row] = d
        history_base[row] = chunk.start_pos + n - d
        row += 1
    chain = build_chain(chunks, requests, shapes, num_tokens_padded, previous_rows) if shapes.spec_chain else None
    return SpecInput(verify_indices, draft_tokens, num_drafts, draft_token_index, draft_rows, history_base, chain=chain)


def build_proposal(chunks: Sequence[ScheduledChunk], shapes: StepShapes) -> ProposalInput:
    """The device drafter's inputs: drafting row r feeds its last token at position p_r, then its drafts at
    p_r + 1 .. p_r + k - 1, one token per row and step (rows in the order of their sampled rows)."""
    s, k, b, page_size = shapes.spec_rows, shapes.num_spec_tokens, shapes.max_num_seqs, shapes.page_size
    tokens = np.zeros(s, np.int32)
    positions = np.zeros(s, np.int32)
    verify_rows = np.zeros(s, np.int32)
    block_tables = np.zeros((b, shapes.max_pages_per_seq), np.int32)
    tables, starts = [], []
    row = 0
    for chunk in chunks:
        if not chunk.sample:
            continue
        if chunk.num_drafts:
            r = len(starts)
            last = chunk.start_pos + len(chunk.token_ids) - chunk.num_drafts - 1
            tokens[r] = chunk.token_ids[-chunk.num_drafts - 1]
            positions[r] = last
            verify_rows[r] = row
            table = np.asarray(chunk.block_table, np.int32)
            block_tables[r, : len(table)] = table
            tables.append(table)
            starts.append((last, chunk.num_drafts))
        row += 1
    n = len(starts)
    layouts = []
    for i in range(k):
        slots = np.zeros(s, np.int32)
        kv_lens = np.zeros(b, np.int32)
        for r, (table, (start, d)) in enumerate(zip(tables, starts, strict=True)):
            if i >= d:  # past this row's drafts (fewer than k near max_tokens): write the null page, discarded
                kv_lens[r] = start + d
                continue
            pos = start + i
            slots[r] = table[pos // page_size] * page_size + pos % page_size
            kv_lens[r] = pos + 1
        cu_q_lens = np.minimum(np.arange(b + 1, dtype=np.int32), n)
        layouts.append(
            AttentionLayout(
                slot_mapping=slots,
                kv_lens=kv_lens,
                block_tables=block_tables,
                cu_q_lens=cu_q_lens,
                num_seqs=np.array([n], np.int32),
            )
        )
    return ProposalInput(tokens, positions, layouts, verify_rows)


_NO_PREVIOUS: dict[int, np.ndarray] = {}


def _no_previous(rows: int) -> np.ndarray:
    """prev_tokens of a step that reads nothing from the previous one (one shared zero array per width)."""
    if rows not in _NO_PREVIOUS:
        _NO_PREVIOUS[rows] = np.zeros(rows, np.int32)
    return _NO_PREVIOUS[rows]


def padding_step(shapes: StepShapes, num_tokens_padded: int, *, verification: bool = False) -> StepPlan:
    """A step of bucket ``num_tokens_padded`` with no sequence in it (what programs are compiled from); a
    verification step's (and its drafter's inputs) with ``verification``."""
    empty = SchedulerOutput(chunks=[], num_batched_tokens=0)
    one_bucket = dataclasses.replace(shapes, token_buckets=(num_tokens_padded,))
    plan = build_step(empty, {}, one_bucket, seed_of=lambda r: 0, banned_ids_of=lambda r: ())
    if not verification:
        return plan
    sampling, *_ = build_sampling([], {}, shapes, lambda r: 0, lambda r: (), None, shapes.spec_rows, verifying=True)
    inputs = dataclasses.replace(
        plan.inputs,
        sampling=sampling,
        logits_indices=np.zeros(shapes.max_num_seqs, np.int32),  # as build_sampling gives verification steps
        history_src=np.full(shapes.spec_rows, -1, np.int32),
        history_col=np.zeros(shapes.spec_rows, np.int32),
        spec=build_verification([], shapes, num_tokens_padded),
    )
    return dataclasses.replace(plan, inputs=inputs, proposal=build_proposal([], shapes))
