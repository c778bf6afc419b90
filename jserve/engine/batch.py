"""SchedulerOutput -> padded numpy StepInput, bucketed so only a few shapes are ever compiled.

Layout of one step (T tokens, S = max_num_seqs sequence rows, Pmax pages per row):
```
tokens    [T]  t0 t1 t2 t3 | t4 | t5 t6 | pad pad ...     sequence i owns tokens cu_q_lens[i]:cu_q_lens[i+1]
positions [T]  p  p+1 ...                                  padding rows: position 0, slot 0 (null page)
block_tables [S, Pmax], kv_lens [S], cu_q_lens [S+1]       padding sequences: 0 pages, 0 tokens
logits_indices [S]   last token row of each sampled sequence (others point at row 0 and are ignored)
```
T and Pmax are rounded up to powers of two (capped); S is fixed, so a step's shape is (T bucket, P bucket).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from jserve.engine.request import Request
from jserve.engine.sampler import RowSpec, SamplerFlags, SamplingTensors, make_sampling_tensors
from jserve.engine.scheduler import SchedulerOutput
from jserve.ops import AttentionMetadata
from pallas_kernels.xla_items import choose_q_block, plan_work

_LOGPROB_BUCKETS = (0, 1, 5, 20)


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= 2
    return (*sizes, hi)


def _round_up(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class Buckets:
    """The static shapes a step can take."""

    token_buckets: tuple[int, ...]
    page_buckets: tuple[int, ...]
    max_num_seqs: int

    @classmethod
    def from_limits(
        cls, *, max_num_batched_tokens: int, max_num_seqs: int, max_pages_per_seq: int, min_tokens: int = 8
    ) -> Buckets:
        return cls(
            token_buckets=_powers_of_two(min(min_tokens, max_num_batched_tokens), max_num_batched_tokens),
            page_buckets=_powers_of_two(1, max(1, max_pages_per_seq)),
            max_num_seqs=max_num_seqs,
        )


@dataclass(frozen=True)
class WorkItemsPolicy:
    """Use work-item attention plans; ``sliding_window`` is the model's (one value for every layer)."""

    sliding_window: int | None = None


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInput:
    """Everything the jitted step reads, as arrays (a pytree)."""

    tokens: jax.Array  # [T] i32
    positions: jax.Array  # [T] i32
    meta: AttentionMetadata
    logits_indices: jax.Array  # [S] i32
    sampling: SamplingTensors
    prompt_targets: jax.Array  # [T] i32 next prompt token per row (-1: none); [0] when no prompt logprobs


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
    flags: SamplerFlags
    num_prompt_logprobs: int  # static: 0 = no prompt logprobs this step
    sampled_ids: list[str]  # request id of sample row i (rows past the list are padding)
    prompt_rows: list[PromptLogprobRows]
    num_tokens: int

    @property
    def shape_key(self) -> tuple:
        """Every input shape (the compiled program is keyed on them, with the static flags)."""
        return tuple(leaf.shape for leaf in jax.tree.leaves(self.inputs))


def build_step(
    out: SchedulerOutput,
    requests: dict[str, Request],
    buckets: Buckets,
    page_size: int,
    seed_of: Callable[[Request], int],
    banned_ids_of: Callable[[Request], Sequence[int]],
    work_items: WorkItemsPolicy | None = None,
) -> StepPlan:
    """Packs one SchedulerOutput into padded numpy arrays (see the module docstring for the layout).

    With ``work_items`` (the XLA attention backend), steps holding prefill chunks also carry a work-item plan
    (``pallas_kernels/xla_items.py``), 7-10x faster there than the page loop. Decode-only steps keep the page
    loop: items gain little there and every plan shape is one more compiled program.
    """
    chunks = out.chunks
    num_tokens = sum(len(c.token_ids) for c in chunks)
    t_pad = _round_up(num_tokens, buckets.token_buckets)
    max_pages = max((len(c.block_table) for c in chunks), default=1)
    p_pad = _round_up(max_pages, buckets.page_buckets)
    s_pad = buckets.max_num_seqs

    tokens = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slots = np.zeros(t_pad, np.int32)
    block_tables = np.zeros((s_pad, p_pad), np.int32)
    kv_lens = np.zeros(s_pad, np.int32)
    cu_q_lens = np.full(s_pad + 1, num_tokens, np.int32)
    logits_indices = np.zeros(s_pad, np.int32)
    prompt_targets: np.ndarray | None = None
    rows: list[RowSpec] = []
    sampled_ids: list[str] = []
    prompt_rows: list[PromptLogprobRows] = []
    num_prompt_logprobs = 0

    cursor = 0
    for i, chunk in enumerate(chunks):
        n = len(chunk.token_ids)
        span = slice(cursor, cursor + n)
        tokens[span] = chunk.token_ids
        pos = np.arange(chunk.start_pos, chunk.start_pos + n, dtype=np.int32)
        positions[span] = pos
        table = np.asarray(chunk.block_table, np.int32)
        slots[span] = table[pos // page_size] * page_size + pos % page_size
        block_tables[i, : len(table)] = table
        kv_lens[i] = chunk.start_pos + n
        cu_q_lens[i] = cursor
        request = requests[chunk.request_id]
        if chunk.sample:
            logits_indices[len(sampled_ids)] = cursor + n - 1
            sampled_ids.append(chunk.request_id)
            rows.append(
                RowSpec(
                    params=request.sampling_params,
                    seed=seed_of(request),
                    step=request.num_output_tokens,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=request.output_token_ids,
                    banned_token_ids=banned_ids_of(request),
                )
            )
        if chunk.prompt_logprobs:
            if prompt_targets is None:
                prompt_targets = np.full(t_pad, -1, np.int32)
            prompt = request.prompt_token_ids
            in_prompt = max(0, min(n, len(prompt) - chunk.start_pos))
            targets = pos[:in_prompt] + 1
            valid = targets < len(prompt)
            prompt_targets[cursor : cursor + in_prompt] = np.where(
                valid, np.asarray(prompt)[np.minimum(targets, len(prompt) - 1)], -1
            )
            prompt_rows.append(PromptLogprobRows(chunk.request_id, cursor, in_prompt, chunk.start_pos))
            num_prompt_logprobs = max(num_prompt_logprobs, request.sampling_params.prompt_logprobs or 0)
        cursor += n
    cu_q_lens[len(chunks)] = cursor
    work = None
    if work_items is not None and chunks and max(len(c.token_ids) for c in chunks) > 1:
        q_lens = np.diff(cu_q_lens[: len(chunks) + 1])
        work = plan_work(
            kv_lens,
            cu_q_lens,
            len(chunks),
            block_tables,
            page_size=page_size,
            num_tokens=t_pad,
            q_block=choose_q_block(q_lens),
            sliding_window=work_items.sliding_window,
        )
        block_tables = np.zeros((s_pad, 1), np.int32)  # the plan carries the pages; keep compiled shapes few

    sampling, flags = make_sampling_tensors(rows, pad_to=s_pad)
    flags = dataclasses.replace(flags, num_logprobs=_round_up(flags.num_logprobs, _LOGPROB_BUCKETS))
    if prompt_targets is not None:
        num_prompt_logprobs = _round_up(max(num_prompt_logprobs, 1), _LOGPROB_BUCKETS)
    inputs = StepInput(
        tokens=tokens,
        positions=positions,
        meta=AttentionMetadata(
            slot_mapping=slots,
            kv_lens=kv_lens,
            block_tables=block_tables,
            cu_q_lens=cu_q_lens,
            num_seqs=np.array([len(chunks)], np.int32),
            work=work,
        ),
        logits_indices=logits_indices,
        sampling=sampling,
        prompt_targets=prompt_targets if prompt_targets is not None else np.zeros(0, np.int32),
    )
    return StepPlan(inputs, flags, num_prompt_logprobs, sampled_ids, prompt_rows, num_tokens)
