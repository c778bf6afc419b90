"""ModelRunner: params + physical KV pages + one compiled program per (pipeline stage, token bucket).

With one pipeline stage (the common case) a step is one program: forward -> logits of the sampled rows ->
sampler (and, under a runtime ``lax.cond``, prompt logprobs), KV pages donated, then one device-to-host copy.
Every program is built ahead of time by ``compile_programs`` (before the engine is ready, or in the background
for ``precompile="background"``; loaded from jserve's executable cache when it holds it); ``dispatch`` only ever
calls those executables, so a serving engine cannot compile: a step shape outside the set is a bug and raises.

With ``pp`` stages, each stage owns a contiguous range of layers and those layers' pages on its own
tensor-parallel slice of devices; the engine splits a step into microbatches (disjoint sets of sequences) and
``dispatch`` runs them in pipeline order:

```
time ->      t0     t1     t2     t3     t4
stage 0      mb0    mb1    mb2    mb3
stage 1             mb0    mb1    mb2    mb3
```
JAX dispatch is asynchronous and each stage runs on its own devices, so stage s works on microbatch m while stage
s+1 works on m-1. The bubble is (pp - 1) / (M + pp - 1) of the step for M microbatches; the engine uses
M = pp when it has enough sequences. Hidden states move between stages with ``jax.device_put``.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve.attention import AttentionBackend
from jserve.config import ModelConfig
from jserve.engine.batch import StepInput, StepPlan, padding_step
from jserve.engine.sampler import SamplerOutput, SamplingTensors, sample, top_logprobs
from jserve.engine.shapes import StepShapes, verification_rows
from jserve.executable_cache import ExecutableCache, compile_lowered
from jserve.kv_offload.page_mover import PageMover
from jserve.lora.device import one_slot_shapes, slot_shardings, write_slot, zero_slots
from jserve.lora.targets import LoRASpec, StepLoRA
from jserve.models.layer_stack import StackedLayers, plan_stack, stack_states
from jserve.models.llama import KVCache, kv_cache_shape
from jserve.parallel import sharding as shard_rules
from jserve.quant.kv import is_quantized_kv, kv_bytes_per_token
from jserve.speculative.chain import apply_chain, chain_proposal, for_drafter
from jserve.speculative.config import EARLY_EXIT, SpeculativeConfig
from jserve.speculative.policy import StepCosts, no_dearer_than_larger
from jserve.speculative.propose import draft_tokens, drafting_tensors
from jserve.speculative.verify import SpecOutput, expand_rows, verify

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Host copies of one step's outputs (rows follow StepPlan.sampled_ids / prompt_rows). Arrays the step's
    requests did not ask for are not copied (None)."""

    token_ids: np.ndarray  # [B]
    logprobs: np.ndarray  # [B]
    top_ids: np.ndarray | None  # [B, max_logprobs]
    top_logprobs: np.ndarray | None  # [B, max_logprobs]
    prompt_target_logprobs: np.ndarray | None  # [T]
    prompt_top_ids: np.ndarray | None  # [T, max_logprobs]
    prompt_top_logprobs: np.ndarray | None  # [T, max_logprobs]
    # verification steps: [S, k + 1] emitted tokens per sampled row (num_emitted valid) and their logprobs
    spec_token_ids: np.ndarray | None = None
    num_emitted: np.ndarray | None = None
    spec_logprobs: np.ndarray | None = None
    spec_top_ids: np.ndarray | None = None
    spec_top_logprobs: np.ndarray | None = None
    spec_num_drafts: np.ndarray | None = None  # [S] drafts each row verified (chained rows: the device's)

    def emitted(self, row: int) -> list[int]:
        """The tokens sampled row ``row`` produced: one, or a verification row's accepted drafts + one."""
        if self.spec_token_ids is None:
            return [int(self.token_ids[row])]
        return [int(t) for t in self.spec_token_ids[row, : int(self.num_emitted[row])]]

    def token_logprobs(self, row: int, position: int) -> tuple[float, np.ndarray | None, np.ndarray | None]:
        """(chosen logprob, top ids, top logprobs) of the ``position``-th token row ``row`` produced."""
        if self.spec_token_ids is None:
            top = None if self.top_ids is None else (self.top_ids[row], self.top_logprobs[row])
            return float(self.logprobs[row]), *(top or (None, None))
        top = (
            None
            if self.spec_top_ids is None
            else (self.spec_top_ids[row, position], self.spec_top_logprobs[row, position])
        )
        return float(self.spec_logprobs[row, position]), *(top or (None, None))


def _prompt_logprobs(logits_of: Callable, hidden: jax.Array, targets: jax.Array, k: int):
    """Target-token logprob and top-k of every token row; computed only when some row has a target."""

    def compute(hidden, targets):
        logprobs = jax.nn.log_softmax(logits_of(hidden), axis=-1)
        target_lp = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
        top_ids, top_lp = top_logprobs(logprobs, jnp.asarray(True), k)
        return target_lp, top_ids, top_lp

    def skip(hidden, targets):
        t = targets.shape[0]
        return jnp.zeros(t, jnp.float32), jnp.zeros((t, k), jnp.int32), jnp.zeros((t, k), jnp.float32)

    return jax.lax.cond(jnp.any(targets >= 0), compute, skip, hidden, targets)


def _fill_pending(tokens: jax.Array, src: jax.Array, previous: jax.Array) -> jax.Array:
    """Async scheduling: pending tokens (src >= 0) are the previous step's sampled ids, read on the device."""
    return jnp.where(src >= 0, previous[jnp.maximum(src, 0)], tokens)


def _fill_drafts(tokens: jax.Array, spec) -> jax.Array:
    """A verification step's draft tokens (the device drafter's, or the host's again) in their token rows."""
    drafts, _ = spec.drafts_by_row()
    return tokens.at[spec.draft_token_index.reshape(-1)].set(drafts.reshape(-1), mode="drop")


def _last_emitted(out: SpecOutput, rows: int) -> jax.Array:
    """Each verification row's last emitted token, padded to the engine's rows (what a next step's pending
    token reads, like a plain step's sampled ids)."""
    last = jnp.take_along_axis(out.token_ids, (out.num_emitted - 1)[:, None], axis=1)[:, 0]
    return jnp.pad(last, (0, rows - last.shape[0]))


def _fill_pending_history(t: SamplingTensors, src: jax.Array, col: jax.Array, previous: jax.Array) -> SamplingTensors:
    """The pending token's entry in each row's penalty history (an output token)."""
    if t.token_history.shape[1] == 0:
        return t
    rows = jnp.arange(src.shape[0])
    has = src >= 0
    col = jnp.where(has, col, 0)
    token = jnp.where(has, previous[jnp.maximum(src, 0)], t.token_history[rows, col])
    is_output = has | t.history_is_output[rows, col]
    return dataclasses.replace(
        t,
        token_history=t.token_history.at[rows, col].set(token),
        history_is_output=t.history_is_output.at[rows, col].set(is_output),
    )


def _with_previous_verification(inputs: StepInput, previous: PendingStep) -> StepInput:
    """A step with chained rows reads its previous step's verification outputs (a plain previous step: the
    placeholders the host built, one token emitted per row)."""
    spec = inputs.spec
    if spec is None or spec.chain is None or not previous.plans[0].is_verification:
        return inputs
    verified = previous.outputs[0][2]
    chain = dataclasses.replace(
        spec.chain,
        prev_verified=np.asarray(True),
        prev_spec_tokens=verified.token_ids,
        prev_num_emitted=verified.num_emitted,
    )
    return dataclasses.replace(inputs, spec=dataclasses.replace(spec, chain=chain))


def _unsampled(rows: int, max_logprobs: int) -> SamplerOutput:
    """A deferred step's placeholder samples (``sample_deferred`` replaces them)."""
    return SamplerOutput(
        token_ids=jnp.zeros(rows, jnp.int32),
        logprobs=jnp.zeros(rows, jnp.float32),
        top_ids=jnp.zeros((rows, max_logprobs), jnp.int32),
        top_logprobs=jnp.zeros((rows, max_logprobs), jnp.float32),
    )


def _padded_ids(sampled: SamplerOutput, rows: int) -> SamplerOutput:
    """The next step reads its pending tokens from [B] ids, whatever this bucket's R sampled rows."""
    padding = rows - sampled.token_ids.shape[0]
    return dataclasses.replace(sampled, token_ids=jnp.pad(sampled.token_ids, (0, padding)))


def _sample_step(max_logprobs, replicated, logits, sampling, history_src, history_col, prev_tokens):
    """A deferred step's sampling: its logits, and its masks from the host now that its pending tokens are."""
    sampling = _fill_pending_history(sampling, history_src, history_col, prev_tokens)
    with jax.named_scope("sampler"):
        sampled = _padded_ids(sample(logits, sampling, max_logprobs), prev_tokens.shape[0])
    return jax.lax.with_sharding_constraint(sampled, replicated)


def _every_branch(plan: StepPlan, backend: AttentionBackend) -> StepPlan:
    """An all-padding step whose runtime switches are all on (row 0's settings, token 0's prompt target,
    the backend's alternative path)."""
    t = plan.inputs.sampling
    on = {
        "temperature": 1.0,
        "top_k": 2,
        "top_p": 0.5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "num_logprobs": 1,
    }
    sampling = dataclasses.replace(
        t, **{name: np.where(np.arange(len(t.temperature)) == 0, value, getattr(t, name)) for name, value in on.items()}
    )
    if t.token_bitmask.shape[1]:  # row 0 constrained: token 31 disallowed
        mask = t.token_bitmask.copy()
        mask[0, 0] = 0x7FFFFFFF
        sampling = dataclasses.replace(sampling, token_bitmask=mask)
    targets = plan.inputs.prompt_targets.copy()
    targets[0] = 0
    inputs = dataclasses.replace(
        plan.inputs,
        sampling=sampling,
        prompt_targets=targets,
        attention=backend.alternative(backend.plan(plan.inputs.attention)),
    )
    return dataclasses.replace(plan, inputs=inputs, uses_penalties=True, uses_grammar=True)


def _deferred(plan: StepPlan) -> StepPlan:
    """The plan with its sampling deferred (warm-up: the skipping branch and the sampling program)."""
    inputs = dataclasses.replace(plan.inputs, defer_sampling=np.asarray(True))
    return dataclasses.replace(plan, inputs=inputs, uses_grammar=True)


def _every_verification_branch(plan: StepPlan, backend: AttentionBackend) -> StepPlan:
    """``_every_branch`` for a verification step whose drafter inputs are already planned."""
    proposal = plan.proposal
    plan = _every_branch(dataclasses.replace(plan, proposal=None), backend)
    return dataclasses.replace(plan, proposal=proposal)


_BUILDING: weakref.WeakSet[ModelRunner] = weakref.WeakSet()  # runners that started a background build


@atexit.register
def _stop_background_builds() -> None:
    """At exit, background builds stop starting programs and finish the ones in flight (see stop_background_build)."""
    for runner in list(_BUILDING):
        runner.stop_background_build()


def _run_in_threads(work: Callable, items: list, workers: int, stop: threading.Event) -> None:
    """``work(item)`` for each item on ``workers`` daemon threads (XLA compiles outside the GIL), skipping what
    is left once ``stop`` is set; re-raises the first error. Not a ThreadPoolExecutor: the interpreter joins
    its workers at exit, which would keep a stopped server alive until every background program is built."""
    pending = iter(list(items))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set() and not errors:
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                work(item)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                errors.append(err)

    threads = [threading.Thread(target=worker, daemon=True, name="jserve-build") for _ in range(max(1, workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _abstract(args):
    """``args`` with every device array replaced by its shape, dtype and sharding (what lowering reads)."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) if isinstance(a, jax.Array) else a, args
    )


def _make_stages(cfg: ModelConfig, meshes: list[Mesh] | None, spec: SpeculativeConfig | None) -> list[_Stage]:
    """One stage per mesh, each with a contiguous range of layers (one device by default)."""
    meshes = meshes or [Mesh(np.asarray(jax.devices()[:1]), ("tp",))]
    layer_ranges = split_layers(cfg.num_layers, len(meshes))
    stages = [
        _Stage(layers, mesh, first=s == 0, last=s == len(meshes) - 1)
        for s, (mesh, layers) in enumerate(zip(meshes, layer_ranges, strict=True))
    ]
    if spec is not None and (len(stages) > 1 or jax.process_count() > 1):
        raise ValueError("speculative_model: speculative decoding runs with pipeline_parallel_size 1, in one process")
    return stages


def _mirror_to_draft(mirror: tuple, draft_leaves, draft_kv, tokens: jax.Array, inputs: StepInput, backend):
    """Draft-model speculation: the draft model's K/V of the step's tokens (while ``inputs.run_draft``), so its
    cache holds every token the target computed."""
    draft_graphdef, draft_treedef, draft_layers, draft_sharding = mirror
    draft_state, draft_stacked, _ = jax.tree.unflatten(draft_treedef, draft_leaves)
    drafter = nnx.merge(draft_graphdef, draft_state)

    def mirrored(draft_kv):
        _, draft_kv = drafter.run_layers(
            drafter.embed(tokens),
            inputs.positions,
            draft_kv,
            inputs.attention,
            backend,
            range(draft_layers),
            rope_lens=inputs.rope_lens,
            stacked=draft_stacked,
        )
        return _constrain_pages(draft_kv, draft_sharding, None)

    return jax.lax.cond(inputs.run_draft, mirrored, lambda kv: kv, draft_kv)


def _sampled_rows(model, hidden, inputs: StepInput, sampling: SamplingTensors, max_logprobs: int, keep: bool):
    """A plain step's head: logits of the rows that sample, then the sampler (skipped for a deferred step);
    the logits too when ``keep`` (a deferred step's sampling program reads them)."""
    logits = model.logits(hidden[inputs.logits_indices])
    with jax.named_scope("sampler"):
        sampled = jax.lax.cond(
            inputs.defer_sampling,
            lambda logits, t: _unsampled(logits.shape[0], max_logprobs),
            functools.partial(sample, max_logprobs=max_logprobs),
            logits,
            sampling,
        )
    return _padded_ids(sampled, inputs.prev_tokens.shape[0]), logits if keep else None


def _verified_rows(model, hidden, inputs: StepInput, sampling: SamplingTensors, max_logprobs: int):
    """A verification step's head: every verified position's logits, the drafts' acceptance, and each row's
    last emitted token as the step's sampled ids (what a next step's pending tokens read)."""
    spec = inputs.spec
    s, j = spec.verify_indices.shape
    r = verification_rows(inputs.tokens.shape[0], s, j)  # the host put no more sampled rows in this bucket
    drafts, probs = spec.drafts_by_row()
    drafts, probs, num_drafts = drafts[:r], None if probs is None else probs[:r], spec.num_drafts[:r]
    mask = sampling.token_bitmask[: r * j]  # (one row per verified position)
    sampling = jax.tree.map(lambda a: a[:r], dataclasses.replace(sampling, token_bitmask=mask[:0]))
    sampling = dataclasses.replace(sampling, token_bitmask=mask)
    rows = expand_rows(sampling, drafts, num_drafts, spec.history_base[:r])
    logits = model.logits(hidden[spec.verify_indices[:r].reshape(-1)])
    verified = _padded_rows(verify(logits, rows, drafts, num_drafts, probs, max_logprobs), s)
    b, k = inputs.logits_indices.shape[0], max_logprobs
    sampled = SamplerOutput(
        token_ids=_last_emitted(verified, b),
        logprobs=jnp.zeros(b, jnp.float32),
        top_ids=jnp.zeros((b, k), jnp.int32),
        top_logprobs=jnp.zeros((b, k), jnp.float32),
    )
    return sampled, verified


def _padded_rows(verified: SpecOutput, rows: int) -> SpecOutput:
    """A verification's outputs padded to ``rows`` sampled rows (what the host and the next step read); padding
    rows emit one token of id 0."""

    def pad(a: jax.Array, value=0) -> jax.Array:
        return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=value)

    return dataclasses.replace(
        jax.tree.map(pad, verified), num_emitted=pad(verified.num_emitted, 1), num_drafts=pad(verified.num_drafts)
    )


def _constrain_pages(kv: KVCache, page_sharding, scale_sharding) -> KVCache:
    """The pages [K, N * P, L, H] (and the scales [K, N * P, L] of int8 / fp8 caches) kept on their shardings."""
    return tuple(jax.lax.with_sharding_constraint(a, page_sharding if a.ndim == 4 else scale_sharding) for a in kv)


def _local_copy(array: jax.Array) -> jax.Array:
    """A replicated result's local piece (multi-host: the global array is not fully addressable here)."""
    return array if array.is_fully_addressable else array.addressable_data(0)


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges, earlier stages taking the remainder."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def _stubbed(state: nnx.State, stub: Callable[[tuple], bool]) -> nnx.State:
    """``state`` with the params whose path ``stub`` picks as scalar zeros: the nnx graph stays whole
    (``nnx.merge`` needs every variable) while those params are never read or are held elsewhere."""
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        if stub(path):
            var.set_value(jnp.zeros((), var.get_value().dtype))
    return nnx.from_flat_state(flat)


def _stub_layers(state: nnx.State, layers: range) -> nnx.State:
    """``state`` with the params of ``layers`` as stubs (they live stacked)."""
    return _stubbed(state, lambda path: str(path[0]) == "layers" and int(path[1]) in layers)


def _place_stacked(stacked: StackedLayers, shardings: dict, mesh: Mesh) -> StackedLayers:
    """The stacks on ``mesh``, each split like its layers' own param (the stacking axis whole)."""
    states = []
    for position, state in enumerate(stacked.states):
        first = stacked.stack.members(position)[0]
        flat = nnx.to_flat_state(state)
        for path, var in flat:
            spec = shardings["/".join(str(p) for p in ("layers", first, *path))].spec
            var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, PartitionSpec(None, *spec))))
        states.append(nnx.from_flat_state(flat))
    return StackedLayers(tuple(states), stacked.stack)


def _param_name(path: tuple, first_layer: int) -> str:
    """'embed/embedding', 'layers/0/attn/q_proj', or 'stacked/2/attn/q_proj': the stack whose first member is
    layer 2 (``first_layer``: the first layer of the stage's stack)."""
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    keys = [k for k in keys if k not in ("value", "states")]
    if keys[0] == "0":
        return "/".join(keys[1:])
    if keys[0] == "2":  # adapter slots: lora/{target}/A or B
        return "/".join(["lora", keys[1], "AB"[int(keys[2])]])
    return "/".join(["stacked", str(first_layer + int(keys[1])), *keys[2:]])


def _stage_state(state: nnx.State, layers: range, first: bool, last: bool, tied: bool) -> nnx.State:
    """This stage's params; params of other stages become scalar stubs (``_stubbed``), never read: a stage
    only calls its own layers, plus the embedding (first stage, and the last one when embeddings are tied) and
    the final norm / LM head (last stage).
    """

    def keep(path: tuple) -> bool:
        head = str(path[0])
        if head == "layers":
            return int(path[1]) in layers
        if head == "embed":
            return first or (last and tied)
        return last  # final_norm, lm_head

    return _stubbed(state, lambda path: not keep(path))


@dataclass
class PendingStep:
    """A dispatched step whose results are still on the device."""

    plans: list[StepPlan]
    outputs: list


@dataclass
class _Stage:
    layers: range
    mesh: Mesh
    first: bool
    last: bool
    param_leaves: list = field(default_factory=list)
    treedef: object = None  # of (nnx state, StackedLayers or None, LoRAWeights or None), flattened to param_leaves
    param_names: list[str] = field(default_factory=list)
    kv_cache: KVCache = ()
    kv_sharding: NamedSharding | None = None
    kv_scale_sharding: NamedSharding | None = None  # of the scales of int8 / fp8 pages
    fn: object = None  # the jitted stage step (lowered and compiled per bucket by compile_programs)
    lora_positions: list[int] = field(default_factory=list)  # where the adapter slots sit in param_leaves
    lora_write_fn: object = None  # the jitted write of one adapter into one slot (multi-LoRA)
    programs: dict[int, object] = field(default_factory=dict)  # token bucket -> compiled executable


class ModelRunner:
    """Owns the device state; the engine hands it StepPlans (one per microbatch)."""

    def __init__(
        self,
        cfg: ModelConfig,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        *,
        num_pages: int,
        page_size: int,
        kv_dtype,
        shapes: StepShapes,
        backend: AttentionBackend,
        max_logprobs: int,
        stage_meshes: list[Mesh] | None = None,
        spec: SpeculativeConfig | None = None,
        draft: tuple[ModelConfig, nnx.GraphDef, nnx.State] | None = None,
        defer_sampling: bool = False,
        scan_layers: bool = False,
        lora: LoRASpec | None = None,
        kv_offload: bool = False,
    ):
        """``defer_sampling``: also build the sampling programs of deferred steps (structured outputs under
        async scheduling; one stage of one device, one process). ``scan_layers``: run each stage's layers in a loop
        over stacked params (``layer_stack``: trace and compile cost independent of depth) instead of unrolled.
        ``lora``: hold adapter slots (multi-LoRA); each token's slot is a step input. ``kv_offload``: also
        build the programs that copy pages to and from the host tier (``page_mover``)."""
        self.scan_layers = scan_layers
        self.lora = lora
        self.lora_write_programs: dict[int, object] = {}  # stage index -> compiled slot write
        self.config = cfg
        self.spec = spec
        self.draft_config = draft[0] if draft is not None else None
        self.num_pages = num_pages
        self.page_size = page_size
        self.shapes = shapes
        self.ready_shapes = shapes  # the shapes of the buckets whose programs are built (see build_in_background)
        self.backend = backend
        self.max_logprobs = max_logprobs
        self.kv_dtype = kv_dtype
        self.stages = _make_stages(cfg, stage_meshes, spec)
        self.replicated = [shard_rules.replicated(st.mesh) for st in self.stages]
        # NOTE: in one process the step's numpy inputs go straight into the compiled call, which places them
        # by its pinned in_shardings (~0.3 ms a step); jax.device_put of the same ~20 small arrays costs
        # ~1.5 ms of host time. A multi-host mesh needs global arrays, so there they are put explicitly.
        self._multiprocess = jax.process_count() > 1
        self._place_weights_and_pages(state, draft, graphdef)
        self.page_mover = PageMover(self.stages, num_pages, shapes.max_pages_per_seq) if kv_offload else None
        # (not with tensor parallelism: the logits would have to be gathered whole every step to be handed over)
        self.defers_sampling = (
            defer_sampling
            and len(self.stages) == 1
            and self.stages[0].mesh.devices.size == 1
            and not self._multiprocess
            and shapes.bitmask_words > 0
        )
        self._jit_programs(graphdef, draft[1] if draft is not None else None)
        self._place_resident_padding()

    def _place_weights_and_pages(self, state: nnx.State, draft, graphdef: nnx.GraphDef) -> None:
        """Each stage's params and zeroed KV pages on its mesh (and the draft model's), and their sizes."""
        self._draft_treedef = self._draft_graphdef = self._draft_kv_sharding = None
        self.draft_leaves: list = []
        self.draft_kv: KVCache = ()
        self._allocators: dict[tuple, Callable[[], jax.Array]] = {}  # see _filled
        for stage in self.stages:
            self._place_params(stage, state, graphdef)
            self._allocate_kv_cache(stage, self.kv_dtype)
        if draft is not None:
            self._place_draft(self.stages[0], *draft)
        leaves = [leaf for stage in self.stages for leaf in stage.param_leaves] + self.draft_leaves
        self.weight_bytes = sum(leaf.nbytes for leaf in leaves)
        cfg = self.config
        self.kv_bytes_per_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype)

    def _jit_programs(self, graphdef: nnx.GraphDef, draft_graphdef) -> None:
        """The jitted functions (each stage's step, speculation's, deferred sampling) and their program tables,
        which ``compile_programs`` fills."""
        self.verify_programs: dict[int, object] = {}  # token bucket -> compiled verification step
        self.propose_programs: dict[int, object] = {}  # 0 -> the device drafter's k steps (early exit, draft model)
        self.sample_programs: dict[int, object] = {}  # sampled rows -> compiled sampling of deferred steps
        self.executables: ExecutableCache | None = None  # set by the factory: programs loaded, not rebuilt
        self.compile_on_first_use = False  # EngineArgs.precompile=False: programs compile when first needed
        self._background: threading.Thread | None = None  # precompile="background"'s builder
        self._warming = threading.Lock()  # one warm-up run at a time (they pass the donated KV pages along)
        self._warmed: set[int] = set()  # token buckets whose programs warm_up ran
        self._stop_building = threading.Event()
        self.step_costs = StepCosts(plain={}, verify={})  # filled by measure_step_costs (speculation's policy)
        for stage in self.stages:
            self._jit_step(stage, graphdef)
            if self.lora is not None:
                shardings = tuple(slot_shardings(self.lora, self.config, len(stage.layers), stage.mesh))
                stage.lora_write_fn = jax.jit(write_slot, donate_argnums=(0,), out_shardings=shardings)
        if self.spec is not None:
            self._jit_speculation(self.stages[0], graphdef, draft_graphdef)
        self.sample_fn = jax.jit(
            functools.partial(_sample_step, self.max_logprobs, self.replicated[-1]),
            in_shardings=(None, *[self.replicated[-1]] * 4),
        )

    def _place_resident_padding(self) -> None:
        """All-padding penalty histories and all-ones grammar bitmasks kept on the device, one per count of
        sampled rows R (see StepShapes.sample_rows), swapped in for steps without penalties (saves an [R, H]
        copy) or without structured outputs."""
        shapes = self.shapes

        def history(rows: int) -> tuple[np.ndarray, np.ndarray]:
            return np.full((rows, shapes.history_len), -1, np.int32), np.zeros((rows, shapes.history_len), bool)

        def bitmask(rows: int) -> np.ndarray:
            return np.full((rows, shapes.bitmask_words), -1, np.int32)

        self._empty_history = [
            {rows: jax.device_put(history(rows), rep) for rows in shapes.sample_row_counts} for rep in self.replicated
        ]
        self._open_bitmask = [
            {rows: jax.device_put(bitmask(rows), rep) for rows in shapes.sample_row_counts} for rep in self.replicated
        ]
        self._empty_history_spec = jax.device_put(history(shapes.spec_rows), self.replicated[0])
        self._open_bitmask_spec = jax.device_put(
            bitmask(shapes.spec_rows * (shapes.num_spec_tokens + 1)), self.replicated[0]
        )
        # verification steps without a chained row (or with device drafts) read this instead of sending their
        # [S, W] history
        self._empty_chain_history = jax.device_put(
            np.zeros((shapes.spec_rows, shapes.chain_history_len), np.int32), self.replicated[0]
        )

    # ------------------------------------------------------------------ construction steps

    def _place_params(self, stage: _Stage, state: nnx.State, graphdef: nnx.GraphDef) -> None:
        """Puts this stage's params on its mesh (other stages' params as scalar stubs) as a flat leaf list; with
        ``scan_layers`` its layers' params are stacked (``layer_stack``) and their per-layer copies stubs."""
        st_state = jax.tree.map(lambda x: x, state)  # a copy: placement below must not touch the caller's
        if len(self.stages) > 1:
            st_state = _stage_state(st_state, stage.layers, stage.first, stage.last, self.config.tie_word_embeddings)
        shardings = shard_rules.param_shardings(st_state, self.config, stage.mesh)
        stacked = None
        if self.scan_layers:
            stack = plan_stack(nnx.merge(graphdef, st_state), stage.layers)
            stacked = StackedLayers(stack_states(lambda i: st_state["layers"][i], stack), stack)
            st_state = _stub_layers(st_state, stage.layers)
            stacked = _place_stacked(stacked, shardings, stage.mesh)
        flat = nnx.to_flat_state(st_state)
        for path, var in flat:
            name = "/".join(str(p) for p in path)
            target = shardings[name] if var.get_value().ndim else shard_rules.replicated(stage.mesh)
            var.set_value(jax.device_put(var.get_value(), target))
        lora = None
        if self.lora is not None:
            dtype = state["embed"]["embedding"].get_value().dtype
            lora = zero_slots(self.lora, self.config, len(stage.layers), stage.mesh, dtype)
        with_paths, stage.treedef = jax.tree_util.tree_flatten_with_path((nnx.from_flat_state(flat), stacked, lora))
        stage.param_leaves = [leaf for _, leaf in with_paths]
        stage.param_names = [_param_name(path, stage.layers.start) for path, _ in with_paths]
        stage.lora_positions = [i for i, name in enumerate(stage.param_names) if name.startswith("lora/")]

    def _place_draft(self, stage: _Stage, cfg: ModelConfig, graphdef: nnx.GraphDef, state: nnx.State) -> None:
        """The draft model's params on the stage's mesh (sharded by the same rules) and its own KV pages, with
        the target's page ids and page size (the draft reads the target's block tables)."""
        shardings = shard_rules.param_shardings(state, cfg, stage.mesh)
        flat = nnx.to_flat_state(jax.tree.map(lambda x: x, state))
        for path, var in flat:
            name = "/".join(str(p) for p in path)
            target = shardings[name] if var.get_value().ndim else shard_rules.replicated(stage.mesh)
            var.set_value(jax.device_put(var.get_value(), target))
        self._draft_graphdef = graphdef
        leaves, self._draft_treedef = jax.tree_util.tree_flatten((nnx.from_flat_state(flat), None, None))  # unrolled
        self.draft_leaves = leaves
        if is_quantized_kv(self.kv_dtype):
            raise ValueError("kv_cache_dtype: a draft model runs with an unquantized KV cache ('auto')")
        self._draft_kv_sharding = NamedSharding(stage.mesh, shard_rules.kv_cache_spec(cfg, stage.mesh))
        self._allocate_draft_kv()

    def _filled(self, fill, shape: tuple[int, ...], dtype, sharding) -> Callable[[], jax.Array]:
        """A jitted allocator of a filled, placed array, kept per (fill, shape, dtype, sharding): reallocating the
        pages after a failed step (``reset_kv_cache``) reuses the program built at startup instead of lowering
        a new one while serving."""
        key = (fill, shape, jnp.dtype(dtype), sharding)
        if key not in self._allocators:
            self._allocators[key] = jax.jit(functools.partial(fill, shape, dtype), out_shardings=sharding)
        return self._allocators[key]

    def _allocate_draft_kv(self) -> None:
        """The draft model's zeroed pages: the target's page ids and page size, the draft's layers."""
        shape = kv_cache_shape(self.draft_config, self.num_pages, self.page_size, self.draft_config.num_layers)
        zeros = self._filled(jnp.zeros, shape, self.kv_dtype, self._draft_kv_sharding)
        self.draft_kv = (zeros(), zeros())

    def _allocate_kv_cache(self, stage: _Stage, kv_dtype) -> None:
        stage.kv_sharding = NamedSharding(stage.mesh, shard_rules.kv_cache_spec(self.config, stage.mesh))
        stage.kv_scale_sharding = NamedSharding(stage.mesh, shard_rules.kv_scale_spec(self.config, stage.mesh))
        shape = kv_cache_shape(self.config, self.num_pages, self.page_size, len(stage.layers))
        zeros = self._filled(jnp.zeros, shape, kv_dtype, stage.kv_sharding)
        if not is_quantized_kv(kv_dtype):
            stage.kv_cache = (zeros(), zeros())
            return
        # int8 / fp8 pages: plus one float32 scale per (kv head, token slot), split like the pages' kv heads
        ones = self._filled(jnp.ones, shape[:3], jnp.float32, stage.kv_scale_sharding)
        stage.kv_cache = (zeros(), zeros(), ones(), ones())

    def kv_cache_usable(self) -> bool:
        """False when a failed step left the KV pages (or the draft's) deleted or holding a device error."""
        leaves = jax.tree.leaves([stage.kv_cache for stage in self.stages] + [self.draft_kv])
        try:
            jax.block_until_ready(leaves)
        except Exception:  # noqa: BLE001 - the error of the step that produced them
            return False
        return not any(leaf.is_deleted() for leaf in leaves)

    def reset_kv_cache(self) -> None:
        """Fresh zeroed pages for every stage (and the draft), after a failure made the old ones unusable; every
        request is recomputed anyway. Raises if the device cannot allocate them (then the engine is dead)."""
        for stage in self.stages:
            self._allocate_kv_cache(stage, self.kv_dtype)
        if self.draft_kv:
            self._allocate_draft_kv()

    def _jit_step(self, stage: _Stage, graphdef: nnx.GraphDef) -> None:
        backend = self.backend.with_mesh(stage.mesh if stage.mesh.devices.size > 1 else None)
        # NOTE: params travel as a flat tuple of arrays; re-flattening an nnx.State per call costs ms.
        stage.fn = jax.jit(
            functools.partial(
                self._stage_step,
                graphdef,
                stage.treedef,
                backend,
                stage.layers,
                stage.first,
                stage.last,
                stage.kv_sharding,
                stage.kv_scale_sharding,
                self.max_logprobs,
                self._mirror(),
                self.defers_sampling,
                self._chain_rule(),
            ),
            # (param_leaves, kv_cache, x, inputs, draft_leaves, draft_kv): the step's inputs are pinned
            # replicated, so numpy inputs passed straight in run exactly like device_put ones
            in_shardings=(None, None, None, shard_rules.replicated(stage.mesh), None, None),
            donate_argnums=(1, 5),
        )

    def _chain_rule(self):
        """How a verification step makes its chained rows exact on the device (n-gram: drafts looked up there
        too), or None."""
        if not self.shapes.spec_chain:
            return None
        lookup = (self.spec.prompt_lookup_min, self.spec.prompt_lookup_max) if self.shapes.spec_lookup else None
        return functools.partial(apply_chain, page_size=self.shapes.page_size, lookup=lookup)

    def _mirror(self):
        """The draft model the target's steps also run their tokens through (its K/V stay complete), or None."""
        if self.draft_config is None:
            return None
        return (self._draft_graphdef, self._draft_treedef, self.draft_config.num_layers, self._draft_kv_sharding)

    def _jit_speculation(self, stage: _Stage, graphdef: nnx.GraphDef, draft_graphdef) -> None:
        """The verification step (the stage step on a verification layout) and the device drafter."""
        backend = self.backend.with_mesh(stage.mesh if stage.mesh.devices.size > 1 else None)
        stage.verify_fn = stage.fn  # one function: a verification layout traces its own programs
        if not self.spec.samples_drafts:
            return
        if self.spec.method == EARLY_EXIT:
            drafter = (graphdef, stage.treedef, range(self.spec.exit_layer), stage.layers)
            shardings = (stage.kv_sharding, stage.kv_scale_sharding)
        else:
            drafter = (draft_graphdef, self._draft_treedef, range(self.draft_config.num_layers), None)
            shardings = (self._draft_kv_sharding, None)
        chain_rule = None
        if self.shapes.spec_chain:
            chain_rule = functools.partial(chain_proposal, page_size=self.shapes.page_size)
        self.propose_fn = jax.jit(
            functools.partial(self._propose, drafter, backend, *shardings, chain_rule),
            in_shardings=(None, None, None, None, *[shard_rules.replicated(stage.mesh)] * 4),
            donate_argnums=(1, 3),
        )

    @staticmethod
    def _propose(
        drafter,
        backend,
        kv_sharding,
        kv_scale_sharding,
        chain_rule,
        param_leaves,
        kv_cache,
        draft_leaves,
        draft_kv,
        proposal,
        sampling,
        chain,
        prev_tokens,
    ):
        """k draft steps: early exit over the target's first layers and pages, or the draft model over its own.
        ``chain``: the verification's chained rows (None when the engine does not chain), moved back first."""
        graphdef, treedef, layers, kv_layers = drafter  # kv_layers: early exit's (the target's pages), else None
        early_exit = kv_layers is not None
        if chain is not None:
            proposal, sampling = chain_rule(proposal, chain, prev_tokens, sampling, backend)
        # (early exit drafts with the base model's first layers: a request's adapter applies when verifying)
        state, stacked, _ = jax.tree.unflatten(treedef, param_leaves if early_exit else draft_leaves)
        model = nnx.merge(graphdef, state)
        rows = jax.tree.map(lambda a: a[proposal.verify_rows], drafting_tensors(sampling))
        pages, drafts, q = draft_tokens(
            model,
            layers,
            kv_cache if early_exit else draft_kv,
            proposal.tokens,
            proposal.positions,
            proposal.attention,
            backend,
            rows,
            kv_layers=kv_layers,
            stacked=stacked,
        )
        pages = _constrain_pages(pages, kv_sharding, kv_scale_sharding)
        if early_exit:
            kv_cache = pages
        else:
            draft_kv = pages
        replicated = jax.sharding.NamedSharding(kv_sharding.mesh, jax.sharding.PartitionSpec())
        return kv_cache, draft_kv, jax.lax.with_sharding_constraint((drafts, q), replicated)

    # ------------------------------------------------------------------ programs

    def compile_programs(
        self,
        progress: Callable[[int], None] | None = None,
        buckets: Sequence[int] | None = None,
        *,
        publish_each: bool = False,
        warm: bool = False,
    ) -> int:
        """Builds (compiles, or loads from the executable cache) the programs of ``buckets`` (None: every token
        bucket, and speculation's programs); returns how many. ``progress(n)`` is called as each finishes.
        Worker threads trace and lower (under the GIL) while XLA compiles (outside it; one compile at a time on
        CPU, ``compile_lowered``). ``publish_each``: a bucket becomes usable (``ready_shapes``) as soon as its
        programs are built, not once all are. ``warm``: each bucket is warmed (``warm_up``) as soon as its
        programs are built (before ready only: nothing else may run steps meanwhile)."""
        scope = self.shapes.token_buckets if buckets is None else buckets
        tasks = self._bucket_tasks(scope)
        if buckets is None and self.spec is not None:
            tasks += self._speculation_tasks()

        def build(task):
            fn, programs, key, args = task
            programs[key] = self._compile(fn, args)
            if publish_each:
                self._publish_ready_buckets()
            if progress is not None:
                progress(1)
            if warm:
                self._warm_built(scope)

        _run_in_threads(build, tasks, min(len(tasks), os.cpu_count() or 1), self._stop_building)
        self._publish_ready_buckets()
        return len(tasks)

    def _bucket_tasks(self, buckets: Sequence[int]) -> list[tuple]:
        """(fn, programs, key, abstract args) of each stage's step program of ``buckets``, and of the sampling
        programs their deferred steps need (not yet built)."""
        tasks, rows_needed = [], set()
        for bucket in buckets:
            x = None
            for stage in self.stages:
                args = self._example_args(stage, bucket, x)
                if not stage.last:
                    x = jax.eval_shape(stage.fn, *args)[2]
                tasks.append((stage.fn, stage.programs, bucket, args))
            rows_needed.add(self.shapes.sample_rows(bucket))
        tasks += self._lora_tasks()
        if self.page_mover is not None:
            tasks += self.page_mover.tasks()  # with the first buckets: a page may be evicted in the first step
        if self.defers_sampling:
            for rows in sorted(rows_needed - set(self.sample_programs)):
                tasks.append((self.sample_fn, self.sample_programs, rows, self._sample_args(rows)))
        return tasks

    def _lora_tasks(self) -> list[tuple]:
        """Each stage's slot-write program, while not built (it comes with the first buckets: an adapter may be
        loaded as soon as the engine is ready)."""
        if self.lora is None:
            return []
        return [
            (stage.lora_write_fn, self.lora_write_programs, s, self._lora_write_args(stage))
            for s, stage in enumerate(self.stages)
            if s not in self.lora_write_programs
        ]

    def _lora_write_args(self, stage: _Stage, slot: int | None = None, values: tuple | None = None) -> tuple:
        """(slots, slot, values) of a stage's slot write; abstract when ``values`` is None."""
        slots = tuple(stage.param_leaves[i] for i in stage.lora_positions)
        if values is None:
            values = tuple(
                jax.ShapeDtypeStruct(shape, a.dtype, sharding=a.sharding)
                for shape, a in zip(one_slot_shapes(slots), slots, strict=True)
            )
            return (_abstract(slots), jax.ShapeDtypeStruct((), jnp.int32), values)
        placed = tuple(jax.device_put(v.astype(a.dtype), a.sharding) for v, a in zip(values, slots, strict=True))
        return (slots, np.int32(slot), placed)

    def write_lora_slot(self, slot: int, adapter) -> None:
        """Writes ``adapter`` (a ``HostAdapter``) into device slot ``slot`` (0-based) of every stage. Queued
        like a step (asynchronous): the host-to-device copy overlaps the steps already on the device, and the
        steps dispatched after it read the new slot."""
        for s, stage in enumerate(self.stages):
            args = self._lora_write_args(stage, slot, adapter.slot_values(stage.layers, self.lora.targets))
            program = self.program_for(self.lora_write_programs, s, stage.lora_write_fn, args, "adapter slot write")
            for position, array in zip(stage.lora_positions, program(*args), strict=True):
                stage.param_leaves[position] = array

    def _speculation_tasks(self) -> list[tuple]:
        """The verification programs of every verification bucket, and the device drafter's."""
        stage, tasks = self.stages[0], []
        for bucket in self.shapes.spec_token_buckets:
            plan = self._planned(padding_step(self.shapes, bucket, verification=True))
            inputs = self._verification_inputs(plan)
            args = _abstract((stage.param_leaves, stage.kv_cache, None, inputs, self.draft_leaves, self.draft_kv))
            tasks.append((stage.fn, self.verify_programs, bucket, args))
        if self.spec.samples_drafts:
            plan = self._planned(padding_step(self.shapes, self.shapes.spec_token_buckets[0], verification=True))
            kv, drafts = stage.kv_cache, self.draft_kv
            inputs = plan.inputs
            chain = for_drafter(inputs.spec.chain)
            args = (stage.param_leaves, kv, self.draft_leaves, drafts, plan.proposal, inputs.sampling, chain)
            args = _abstract((*args, inputs.prev_tokens))
            tasks.append((self.propose_fn, self.propose_programs, 0, args))
        return tasks

    def _bucket_ready(self, bucket: int) -> bool:
        """Whether every program a plain step of ``bucket`` may run is built (each stage's, and its sampling's)."""
        if not all(bucket in stage.programs for stage in self.stages):
            return False
        return not self.defers_sampling or self.shapes.sample_rows(bucket) in self.sample_programs

    def _publish_ready_buckets(self) -> None:
        """Sets ``ready_shapes`` to the buckets built so far (one assignment: the engine thread reads it)."""
        ready = tuple(b for b in self.shapes.token_buckets if self._bucket_ready(b))
        if ready:
            self.ready_shapes = dataclasses.replace(self.shapes, token_buckets=ready)

    def first_buckets(self) -> list[int]:
        """What ``precompile="background"`` builds before ready: the smallest bucket (one-token decode) and one
        prefill bucket, the smallest that holds 256 tokens and a full batch of decodes (or the largest)."""
        buckets = self.shapes.token_buckets
        prefill = next((b for b in buckets if b >= max(256, self.shapes.max_num_seqs)), buckets[-1])
        return sorted({buckets[0], prefill})

    def build_in_background(self) -> threading.Thread:
        """Builds the buckets not yet built in a daemon thread (in worker threads as at start); each becomes
        usable (in ``ready_shapes``) once built. Smaller buckets first: a missing one pads decode steps to a
        larger one, while a missing large bucket only chunks long prefills more finely."""
        rest = [b for b in self.shapes.token_buckets if not self._bucket_ready(b)]

        def run() -> None:
            try:
                self.compile_programs(buckets=rest, publish_each=True)
            except Exception:  # noqa: BLE001 - serving goes on with the programs it has
                logger.exception("background build failed; serving with the programs built so far")

        self._background = threading.Thread(target=run, name="jserve-background-build", daemon=True)
        _BUILDING.add(self)
        self._background.start()
        return self._background

    def stop_background_build(self, timeout: float = 30.0) -> None:
        """Starts no further program and waits (up to ``timeout``) for the ones compiling: a process must not
        exit while XLA compiles in one of its threads."""
        self._stop_building.set()
        if self._background is not None:
            self._background.join(timeout)

    def _example_args(self, stage: _Stage, bucket: int, x) -> tuple:
        """A padding step's arguments, abstract (the pages may be donated meanwhile: builds run in threads)."""
        inputs = self._planned(padding_step(self.shapes, bucket)).inputs
        if x is not None:
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard_rules.replicated(stage.mesh))
        return _abstract((stage.param_leaves, stage.kv_cache, x, inputs, self.draft_leaves, self.draft_kv))

    def _sample_args(self, rows: int) -> tuple:
        """Example arguments of the deferred-sampling program for ``rows`` sampled rows."""
        bucket = min(b for b in self.shapes.token_buckets if self.shapes.sample_rows(b) == rows)
        inputs = padding_step(self.shapes, bucket).inputs
        logits = jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.float32, sharding=self.replicated[-1])
        return (logits, inputs.sampling, inputs.history_src, inputs.history_col, inputs.prev_tokens)

    def _verification_inputs(self, plan: StepPlan) -> StepInput:
        """A verification step's inputs as the program sees them: device drafts come with their q."""
        inputs = plan.inputs
        if self.spec.samples_drafts:
            s, k, v = self.shapes.spec_rows, self.shapes.num_spec_tokens, self.config.vocab_size
            spec = dataclasses.replace(inputs.spec, draft_probs=np.zeros((s, k, v), np.float32))
            inputs = dataclasses.replace(inputs, spec=spec)
        return inputs

    def num_program_tasks(self, buckets: Sequence[int] | None = None) -> int:
        """How many programs ``compile_programs(buckets=buckets)`` builds now; None: the engine's whole set."""
        if buckets is None:
            spec = 0 if self.spec is None else len(self.shapes.spec_token_buckets) + bool(self.spec.samples_drafts)
            sampling = len(self.shapes.sample_row_counts) if self.defers_sampling else 0
            lora = self.num_stages if self.lora is not None else 0
            copies = self.page_mover.num_programs if self.page_mover is not None else 0
            return len(self.shapes.token_buckets) * self.num_stages + spec + sampling + lora + copies
        rows = {self.shapes.sample_rows(b) for b in buckets} - set(self.sample_programs)
        lora = len(self._lora_tasks())
        copies = len(self.page_mover.tasks()) if self.page_mover is not None else 0
        return len(buckets) * self.num_stages + (len(rows) if self.defers_sampling else 0) + lora + copies

    @property
    def num_programs(self) -> int:
        return (
            sum(len(stage.programs) for stage in self.stages)
            + len(self.verify_programs)
            + len(self.propose_programs)
            + len(self.sample_programs)
            + len(self.lora_write_programs)
            + (len(self.page_mover.programs) if self.page_mover is not None else 0)
        )

    def warm_up(self, buckets: Sequence[int] | None = None) -> None:
        """Runs each program on an all-padding step (it writes only the null page) with every optional stage
        switched on (sampling, filters, penalties, logprobs, prompt logprobs, the backend's alternative path), so
        first-use costs are paid before serving. A second run with every stage off, as this did before, paid
        nothing more than its own compute (the first real step after ready took as long either way; 0.1-0.3 s
        of the bundled model's warm start). ``buckets``: only these token buckets' programs, and no verification
        programs (None: all)."""
        for bucket in self.shapes.token_buckets if buckets is None else buckets:
            self._warm_bucket(bucket)
        if self.spec is None or buckets is not None:
            return
        for bucket in self.shapes.spec_token_buckets:
            plain = padding_step(self.shapes, bucket, verification=True)
            self.collect(self.dispatch([plain]))
            planned_proposal = self._planned(plain).proposal
            every = _every_verification_branch(plain, self.backend)
            self.collect(self.dispatch([dataclasses.replace(every, proposal=planned_proposal)], planned=True))

    def _warm_bucket(self, bucket: int) -> None:
        """``warm_up``'s runs of one token bucket's programs (once: a bucket warmed as it was built is skipped)."""
        with self._warming:
            if bucket in self._warmed:
                return
            plain = padding_step(self.shapes, bucket)
            self.collect(self.dispatch([_every_branch(plain, self.backend)], planned=True))
            if self.defers_sampling:
                deferred = _deferred(plain)
                pending = self.dispatch([deferred])
                self.collect(self.sample_deferred(pending, deferred.inputs.sampling.token_bitmask))
            self._warmed.add(bucket)

    def _warm_built(self, buckets: Sequence[int]) -> None:
        """Warms the buckets of ``buckets`` whose programs are all built, while the build threads go on loading
        or compiling the rest: a program's first run (~50-100 ms of one-time costs on CPU) then overlaps them
        instead of following them all."""
        for bucket in buckets:
            if bucket not in self._warmed and self._bucket_ready(bucket):
                self._warm_bucket(bucket)

    def measure_step_costs(self, repeats: int = 3) -> StepCosts:
        """Times every compiled program (fastest of ``repeats`` all-padding runs, after ``warm_up``): a plain
        step per token bucket and a verification step per verification bucket (the device drafter included),
        which the speculation policy weighs. The fastest run, and no bucket dearer than a larger one
        (``no_dearer_than_larger``): a run that met another thread's work reads high, never low. Padding steps
        attend to nothing; the engine corrects for that and for the host's share with the wall time of real
        steps (``StepCosts.observe``)."""

        def timed(plan: StepPlan) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                self.collect(self.dispatch([plan]))
                times.append(time.perf_counter() - start)
            return min(times)

        plain = {b: timed(padding_step(self.shapes, b)) for b in self.shapes.token_buckets}
        verify = {b: timed(padding_step(self.shapes, b, verification=True)) for b in self.shapes.spec_token_buckets}
        self.step_costs.plain = no_dearer_than_larger(plain)
        self.step_costs.verify = no_dearer_than_larger(verify)
        self.step_costs.verify_rows = {b: self.shapes.verify_rows(b) for b in self.shapes.spec_token_buckets}
        return self.step_costs

    # ------------------------------------------------------------------ the step

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def param_leaves(self) -> list:
        return self.stages[0].param_leaves

    @property
    def kv_cache(self) -> list[KVCache]:
        """Each stage's pages (its layers', layer-major), in stage order."""
        return [stage.kv_cache for stage in self.stages]

    @staticmethod
    def _stage_step(
        graphdef,
        treedef,
        backend,
        layers,
        first,
        last,
        kv_sharding,
        kv_scale_sharding,
        max_logprobs,
        mirror,
        defers_sampling,
        chain_rule,
        param_leaves,
        kv_cache,
        x,
        inputs: StepInput,
        draft_leaves,
        draft_kv,
    ):
        state, stacked, lora_slots = jax.tree.unflatten(treedef, param_leaves)
        model = nnx.merge(graphdef, state)
        if inputs.spec is not None and inputs.spec.chain is not None:
            inputs = chain_rule(inputs, backend)  # rows chained to a verification still running: made exact
        spec = inputs.spec
        if first:
            tokens = _fill_pending(inputs.tokens, inputs.token_src, inputs.prev_tokens)
            if spec is not None:
                tokens = _fill_drafts(tokens, spec)
            with jax.named_scope("embed"):
                x = model.embed(tokens)
        lora = None
        if lora_slots is not None:
            lora = StepLoRA.for_step(lora_slots, inputs.lora_slots, x.dtype)
        x, kv_cache = model.run_layers(
            x,
            inputs.positions,
            kv_cache,
            inputs.attention,
            backend,
            layers,
            rope_lens=inputs.rope_lens,
            stacked=stacked,
            lora=lora,
        )
        kv_cache = _constrain_pages(kv_cache, kv_sharding, kv_scale_sharding)
        if mirror is not None:  # the draft model's K/V of every token the target computes (one stage only)
            draft_kv = _mirror_to_draft(mirror, draft_leaves, draft_kv, tokens, inputs, backend)
        if not last:
            return kv_cache, draft_kv, x
        hidden = model.final_norm(x)
        sampling = _fill_pending_history(inputs.sampling, inputs.history_src, inputs.history_col, inputs.prev_tokens)
        replicated = jax.sharding.NamedSharding(kv_sharding.mesh, jax.sharding.PartitionSpec())
        with jax.named_scope("prompt_logprobs"):
            prompt = _prompt_logprobs(model.logits, hidden, inputs.prompt_targets, max_logprobs)
        if spec is None:
            sampled, kept = _sampled_rows(model, hidden, inputs, sampling, max_logprobs, defers_sampling)
            # replicated results: every process of a multi-host mesh can read them
            return kv_cache, draft_kv, jax.lax.with_sharding_constraint((sampled, prompt, kept), replicated)
        sampled, verified = _verified_rows(model, hidden, inputs, sampling, max_logprobs)
        return kv_cache, draft_kv, jax.lax.with_sharding_constraint((sampled, prompt, verified), replicated)

    def _program(self, stage: _Stage, plan: StepPlan, args: tuple):
        programs = self.verify_programs if plan.is_verification else stage.programs
        kind = "verification" if plan.is_verification else "step"
        return self.program_for(programs, plan.bucket, stage.fn, args, f"{kind} program for token bucket {plan.bucket}")

    def _compile(self, fn, args: tuple):
        """``fn``'s program on ``args``: loaded from the executable cache when it holds it, else compiled."""
        if self.executables is None:
            return compile_lowered(fn.lower(*args))
        return self.executables.build(fn, args)

    def program_for(self, programs: dict, key, fn, args: tuple, what: str):
        """A program of ``programs``, built on first use only where ``compile_on_first_use`` allows it."""
        program = programs.get(key)
        if program is None:
            if not self.compile_on_first_use:
                raise RuntimeError(f"no compiled {what} (compile_programs not run?)")
            program = programs[key] = self._compile(fn, args)
        return program

    def _planned(self, plan: StepPlan) -> StepPlan:
        """The plan with its attention layout replaced by the backend's metadata (host-side planning); the
        device drafter's k layouts are planned and stacked on a leading axis (one scan step each)."""
        layout = plan.inputs.attention
        short = (
            plan.is_verification and int(np.diff(layout.cu_q_lens).max(initial=0)) <= self.shapes.num_spec_tokens + 1
        )
        attention = self.backend.plan_short(layout) if short else self.backend.plan(layout)
        inputs = dataclasses.replace(plan.inputs, attention=attention)
        proposal = plan.proposal
        if proposal is not None and isinstance(proposal.attention, list):
            planned = [self.backend.plan_short(lay) for lay in proposal.attention]
            stacked = jax.tree.map(lambda *a: np.stack(a), *planned)
            proposal = dataclasses.replace(proposal, attention=stacked)
        return dataclasses.replace(plan, inputs=inputs, proposal=proposal)

    def _with_history(self, plan: StepPlan, s: int) -> StepInput:
        """Steps without penalties read the resident all-padding history instead of copying theirs, and steps
        without structured outputs the resident all-ones bitmask."""
        inputs = plan.inputs
        if plan.uses_penalties and plan.uses_grammar:
            return inputs
        sampling = inputs.sampling
        rows = len(sampling.temperature)
        if not plan.uses_penalties:
            history, is_output = self._empty_history_spec if plan.is_verification else self._empty_history[s][rows]
            sampling = dataclasses.replace(sampling, token_history=history, history_is_output=is_output)
        if not plan.uses_grammar:
            mask = self._open_bitmask_spec if plan.is_verification else self._open_bitmask[s][rows]
            sampling = dataclasses.replace(sampling, token_bitmask=mask)
        return dataclasses.replace(inputs, sampling=sampling)

    def _without_chain_history(self, inputs: StepInput) -> StepInput:
        """A verification step that looks no history up (no chained row, or device drafts) reads the resident
        zero history (no [S, W] copy)."""
        spec = inputs.spec
        if spec is None or spec.chain is None or isinstance(spec.chain.history, jax.Array):
            return inputs
        if self.shapes.spec_lookup and (np.asarray(spec.chain.src) >= 0).any():
            return inputs
        chain = dataclasses.replace(spec.chain, history=self._empty_chain_history)
        return dataclasses.replace(inputs, spec=dataclasses.replace(spec, chain=chain))

    def _draft(self, stage: _Stage, plan: StepPlan, inputs: StepInput) -> StepInput:
        """Device-drafted speculation: runs the drafter's k steps and hands its drafts (and their q) to the
        verification step, all on the device (no host round trip between drafting and verifying). Chained rows
        are moved back first, as the verification moves them (``chain_proposal``)."""
        args = (
            stage.param_leaves,
            stage.kv_cache,
            self.draft_leaves,
            self.draft_kv,
            plan.proposal,
            inputs.sampling,
            for_drafter(inputs.spec.chain),
            inputs.prev_tokens,
        )
        stage.kv_cache, self.draft_kv, (drafts, q) = self.program_for(
            self.propose_programs, 0, self.propose_fn, args, "drafting program"
        )(*args)
        inputs = dataclasses.replace(inputs, spec=dataclasses.replace(inputs.spec, draft_tokens=drafts, draft_probs=q))
        if plan.fill_draft_masks is not None:  # structured outputs: the masks after each draft, on the host
            mask = plan.fill_draft_masks(np.asarray(inputs.sampling.token_bitmask), np.asarray(drafts))
            inputs = dataclasses.replace(inputs, sampling=dataclasses.replace(inputs.sampling, token_bitmask=mask))
        return inputs

    def dispatch(
        self, plans: list[StepPlan], previous: PendingStep | None = None, *, planned: bool = False
    ) -> PendingStep:
        """Plans attention, queues the step's programs and returns at once (JAX dispatch is asynchronous), so
        the caller can dispatch other replicas' steps before waiting on this one in ``collect``. ``previous``:
        the step still on the device whose sampled ids fill this step's pending tokens (async scheduling, one
        microbatch)."""
        if not planned:
            plans = [self._planned(p) for p in plans]
        if any(p.reads_previous for p in plans):
            if previous is None or len(previous.outputs) != 1 or len(plans) != 1:
                raise ValueError("a step reading pending tokens needs exactly one previous microbatch")
            inputs = dataclasses.replace(plans[0].inputs, prev_tokens=previous.outputs[0][0].token_ids)
            plans = [dataclasses.replace(plans[0], inputs=_with_previous_verification(inputs, previous))]
        carried: list = [None] * len(plans)
        outputs: list = [None] * len(plans)
        for tick in range(len(plans) + self.num_stages - 1):
            for s in reversed(range(self.num_stages)):  # later stages first: their inputs are already queued
                m = tick - s
                if not 0 <= m < len(plans):
                    continue
                stage, plan = self.stages[s], plans[m]
                inputs = self._with_history(plan, s) if stage.last else plan.inputs
                inputs = self._without_chain_history(inputs)
                if plan.proposal is not None and self.spec is not None and self.spec.samples_drafts:
                    inputs = self._draft(stage, plan, inputs)
                if self._multiprocess:
                    inputs = jax.device_put(inputs, self.replicated[s])
                x = None if stage.first else jax.device_put(carried[m], self.replicated[s])
                args = (stage.param_leaves, stage.kv_cache, x, inputs, self.draft_leaves, self.draft_kv)
                stage.kv_cache, self.draft_kv, out = self._program(stage, plan, args)(*args)
                if stage.last:
                    outputs[m] = out
                else:
                    carried[m] = out
        return PendingStep(plans, outputs)

    def sample_deferred(self, pending: PendingStep, bitmask: np.ndarray) -> PendingStep:
        """Queues a deferred step's sampling (its logits are on the device, or being computed) with the masks
        the host filled meanwhile; its sampled ids replace the step's placeholders, so ``collect`` and the next
        step's pending tokens read them."""
        (plan,) = pending.plans
        if not plan.defers_sampling:
            raise ValueError("sample_deferred: the step did not defer its sampling")
        sampled, prompt, logits = pending.outputs[0]
        inputs = self._with_history(plan, 0)
        sampling = dataclasses.replace(inputs.sampling, token_bitmask=bitmask)
        args = (logits, sampling, inputs.history_src, inputs.history_col, inputs.prev_tokens)
        rows = int(logits.shape[0])
        what = f"sampling program for {rows} rows"
        program = self.program_for(self.sample_programs, rows, self.sample_fn, args, what)
        pending.outputs[0] = (program(*args), prompt, logits)
        return pending

    def collect(self, pending: PendingStep) -> list[StepResult]:
        """Copies what the step's requests need to the host, in one transfer (the step's one sync)."""
        wanted = []
        for plan, (sampled, prompt, extra) in zip(pending.plans, pending.outputs, strict=True):
            spec = None
            if plan.is_verification:
                v = extra
                spec = (
                    v.token_ids,
                    v.num_emitted,
                    v.logprobs,
                    (v.top_ids, v.top_logprobs) if plan.wants_top_logprobs else None,
                    v.num_drafts,
                )
            wanted.append(
                (
                    sampled.token_ids,
                    sampled.logprobs if spec is None else None,
                    (sampled.top_ids, sampled.top_logprobs) if plan.wants_top_logprobs and spec is None else None,
                    prompt if plan.prompt_rows else None,
                    spec,
                )
            )
        host = jax.device_get(jax.tree.map(_local_copy, wanted))
        results = []
        for ids, lps, top, prompt, spec in host:
            result = StepResult(
                token_ids=ids,
                logprobs=lps,
                top_ids=None if top is None else top[0],
                top_logprobs=None if top is None else top[1],
                prompt_target_logprobs=None if prompt is None else prompt[0],
                prompt_top_ids=None if prompt is None else prompt[1],
                prompt_top_logprobs=None if prompt is None else prompt[2],
            )
            if spec is not None:
                spec_ids, emitted, spec_lps, spec_top, drafted = spec
                result = dataclasses.replace(
                    result,
                    spec_token_ids=spec_ids,
                    num_emitted=emitted,
                    spec_num_drafts=drafted,
                    spec_logprobs=spec_lps,
                    spec_top_ids=None if spec_top is None else spec_top[0],
                    spec_top_logprobs=None if spec_top is None else spec_top[1],
                )
            results.append(result)
        return results

    def params(self) -> dict[str, jax.Array]:
        """Flat param name -> the placed array (the owning stage's copy; stubs of other stages skipped)."""
        return {
            name: leaf
            for stage in self.stages
            for name, leaf in zip(stage.param_names, stage.param_leaves, strict=True)
            if leaf.ndim
        }
