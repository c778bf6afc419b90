"""ModelRunner: params + physical KV pages + one compiled program per (pipeline stage, token bucket).

With one pipeline stage (the common case) a step is one program: forward -> logits of the sampled rows ->
sampler (and, under a runtime ``lax.cond``, prompt logprobs), KV pages donated, then one device-to-host copy.
Every program is compiled ahead of time by ``compile_programs`` (before the engine is ready, in parallel
threads, through jax's persistent compilation cache); ``dispatch`` only ever calls those executables, so a
serving engine cannot compile: a step shape outside the set is a bug and raises.

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

import dataclasses
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jserve.attention import AttentionBackend
from jserve.config import ModelConfig
from jserve.engine.batch import StepInput, StepPlan, padding_step
from jserve.engine.sampler import SamplingTensors, sample, top_logprobs
from jserve.engine.shapes import StepShapes
from jserve.models.llama import KVCache, kv_cache_shape
from jserve.parallel import sharding as shard_rules
from jserve.quant.kv import is_quantized_kv, kv_bytes_per_token


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
    targets = plan.inputs.prompt_targets.copy()
    targets[0] = 0
    inputs = dataclasses.replace(
        plan.inputs,
        sampling=sampling,
        prompt_targets=targets,
        attention=backend.alternative(backend.plan(plan.inputs.attention)),
    )
    return dataclasses.replace(plan, inputs=inputs, uses_penalties=True)


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


def _stage_state(state: nnx.State, layers: range, first: bool, last: bool, tied: bool) -> nnx.State:
    """This stage's params; params of other stages become scalar stubs.

    NOTE: the stubs keep the nnx graph whole (``nnx.merge`` needs every variable) and are never read: a stage
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

    flat = nnx.to_flat_state(state)
    for path, var in flat:
        if not keep(path):
            var.set_value(jnp.zeros((), var.get_value().dtype))
    return nnx.from_flat_state(flat)


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
    param_names: list[str] = field(default_factory=list)
    kv_cache: KVCache = field(default_factory=list)
    kv_sharding: NamedSharding | None = None
    kv_scale_sharding: NamedSharding | None = None  # of the scales of int8 / fp8 pages
    fn: object = None  # the jitted stage step (lowered and compiled per bucket by compile_programs)
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
    ):
        self.config = cfg
        self.num_pages = num_pages
        self.page_size = page_size
        self.shapes = shapes
        self.backend = backend
        self.max_logprobs = max_logprobs
        self.kv_dtype = kv_dtype
        meshes = stage_meshes or [Mesh(np.asarray(jax.devices()[:1]), ("tp",))]
        self.stages = [
            _Stage(layers, mesh, first=s == 0, last=s == len(meshes) - 1)
            for s, (mesh, layers) in enumerate(zip(meshes, split_layers(cfg.num_layers, len(meshes)), strict=True))
        ]
        for stage in self.stages:
            self._place_params(stage, state)
            self._allocate_kv_cache(stage, kv_dtype)
            self._jit_step(stage, graphdef)
        self.replicated = [shard_rules.replicated(st.mesh) for st in self.stages]
        self.weight_bytes = sum(leaf.nbytes for stage in self.stages for leaf in stage.param_leaves)
        self.kv_bytes_per_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
        self.compile_on_first_use = False  # EngineArgs.precompile=False: programs compile when first needed
        # Resident all-padding penalty history, swapped in for steps without penalties (saves a [B, H] copy).
        self._empty_history = [
            jax.device_put(
                (
                    np.full((shapes.max_num_seqs, shapes.history_len), -1, np.int32),
                    np.zeros((shapes.max_num_seqs, shapes.history_len), bool),
                ),
                rep,
            )
            for rep in self.replicated
        ]
        # NOTE: in one process the step's numpy inputs go straight into the compiled call, which places them
        # by its pinned in_shardings (~0.3 ms a step); jax.device_put of the same ~20 small arrays costs
        # ~1.5 ms of host time. A multi-host mesh needs global arrays, so there they are put explicitly.
        self._multiprocess = jax.process_count() > 1

    # ------------------------------------------------------------------ construction steps

    def _place_params(self, stage: _Stage, state: nnx.State) -> None:
        """Puts this stage's params on its mesh (other stages' params as scalar stubs) as a flat leaf list."""
        st_state = jax.tree.map(lambda x: x, state)  # a copy: placement below must not touch the caller's
        if len(self.stages) > 1:
            st_state = _stage_state(st_state, stage.layers, stage.first, stage.last, self.config.tie_word_embeddings)
        shardings = shard_rules.param_shardings(st_state, self.config, stage.mesh)
        flat = nnx.to_flat_state(st_state)
        for path, var in flat:
            name = "/".join(str(p) for p in path)
            target = shardings[name] if var.get_value().ndim else shard_rules.replicated(stage.mesh)
            var.set_value(jax.device_put(var.get_value(), target))
        with_paths, self._treedef = jax.tree_util.tree_flatten_with_path(nnx.from_flat_state(flat))
        stage.param_leaves = [leaf for _, leaf in with_paths]
        stage.param_names = [
            "/".join(
                str(getattr(k, "key", getattr(k, "idx", k))) for k in path if not str(getattr(k, "name", "")) == "value"
            )
            for path, _ in with_paths
        ]

    def _allocate_kv_cache(self, stage: _Stage, kv_dtype) -> None:
        stage.kv_sharding = NamedSharding(stage.mesh, shard_rules.kv_cache_spec(self.config, stage.mesh))
        stage.kv_scale_sharding = NamedSharding(stage.mesh, shard_rules.kv_scale_spec(self.config, stage.mesh))
        shape = kv_cache_shape(self.config, self.num_pages, self.page_size)
        zeros = jax.jit(functools.partial(jnp.zeros, shape, kv_dtype), out_shardings=stage.kv_sharding)
        if not is_quantized_kv(kv_dtype):
            stage.kv_cache = [(zeros(), zeros()) for _ in stage.layers]
            return
        # int8 / fp8 pages: plus one float32 scale per (kv head, token slot), split like the pages' kv heads
        ones = jax.jit(functools.partial(jnp.ones, shape[:3], jnp.float32), out_shardings=stage.kv_scale_sharding)
        stage.kv_cache = [(zeros(), zeros(), ones(), ones()) for _ in stage.layers]

    def _jit_step(self, stage: _Stage, graphdef: nnx.GraphDef) -> None:
        backend = self.backend.with_mesh(stage.mesh if stage.mesh.devices.size > 1 else None)
        # NOTE: params travel as a flat tuple of arrays; re-flattening an nnx.State per call costs ms.
        stage.fn = jax.jit(
            functools.partial(
                self._stage_step,
                graphdef,
                self._treedef,
                backend,
                stage.layers,
                stage.first,
                stage.last,
                stage.kv_sharding,
                stage.kv_scale_sharding,
                self.max_logprobs,
            ),
            # (param_leaves, kv_cache, x, inputs): the step's inputs are pinned replicated, so numpy inputs
            # passed straight in run exactly like device_put ones
            in_shardings=(None, None, None, shard_rules.replicated(stage.mesh)),
            donate_argnums=(1,),
        )

    # ------------------------------------------------------------------ programs

    def compile_programs(self, progress: Callable[[int], None] | None = None) -> int:
        """Lowers and compiles every (stage, token bucket) program; returns how many. ``progress(n)`` is
        called as each finishes. XLA compiles in worker threads (it releases the GIL), tracing stays serial."""
        tasks = []
        for bucket in self.shapes.token_buckets:
            x = None
            for stage in self.stages:
                args = self._example_args(stage, bucket, x)
                if not stage.last:
                    x = jax.eval_shape(stage.fn, *args)[1]
                tasks.append((stage, bucket, args))
        workers = min(len(tasks), os.cpu_count() or 1)

        def build(task):
            stage, bucket, args = task
            stage.programs[bucket] = stage.fn.lower(*args).compile()
            if progress is not None:
                progress(1)

        if workers <= 1:
            for task in tasks:
                build(task)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(build, tasks))
        return len(tasks)

    def _example_args(self, stage: _Stage, bucket: int, x) -> tuple:
        inputs = self._planned(padding_step(self.shapes, bucket)).inputs
        if x is not None:
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard_rules.replicated(stage.mesh))
        return (stage.param_leaves, stage.kv_cache, x, inputs)

    @property
    def num_programs(self) -> int:
        return sum(len(stage.programs) for stage in self.stages)

    def warm_up(self) -> None:
        """Runs each program on all-padding steps (they write only the null page), once with every optional
        stage switched off and once with every one switched on (sampling, filters, penalties, logprobs, prompt
        logprobs, the backend's alternative path), so first-use costs of each branch are paid before serving."""
        for bucket in self.shapes.token_buckets:
            plain = padding_step(self.shapes, bucket)
            self.collect(self.dispatch([plain]))
            self.collect(self.dispatch([_every_branch(plain, self.backend)], planned=True))

    # ------------------------------------------------------------------ the step

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def param_leaves(self) -> list:
        return self.stages[0].param_leaves

    @property
    def kv_cache(self) -> KVCache:
        """All layers' pages, in layer order (across stages)."""
        return [kv for stage in self.stages for kv in stage.kv_cache]

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
        param_leaves,
        kv_cache,
        x,
        inputs: StepInput,
    ):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, param_leaves))
        if first:
            x = model.embed(_fill_pending(inputs.tokens, inputs.token_src, inputs.prev_tokens))
        x, kv_cache = model.run_layers(x, inputs.positions, kv_cache, inputs.attention, backend, layers)
        # pages [K, P, L, H] and, for int8 / fp8 caches, their scales [K, P, L]
        kv_cache = [
            tuple(jax.lax.with_sharding_constraint(a, kv_sharding if a.ndim == 4 else kv_scale_sharding) for a in kv)
            for kv in kv_cache
        ]
        if not last:
            return kv_cache, x
        hidden = model.final_norm(x)
        sampling = _fill_pending_history(inputs.sampling, inputs.history_src, inputs.history_col, inputs.prev_tokens)
        sampled = sample(model.logits(hidden[inputs.logits_indices]), sampling, max_logprobs)
        prompt = _prompt_logprobs(model.logits, hidden, inputs.prompt_targets, max_logprobs)
        # replicated results: every process of a multi-host mesh can read them
        return kv_cache, jax.lax.with_sharding_constraint(
            (sampled, prompt), jax.sharding.NamedSharding(kv_sharding.mesh, jax.sharding.PartitionSpec())
        )

    def _program(self, stage: _Stage, bucket: int, args: tuple):
        program = stage.programs.get(bucket)
        if program is None:
            if not self.compile_on_first_use:
                raise RuntimeError(f"no compiled program for token bucket {bucket} (compile_programs not run?)")
            program = stage.programs[bucket] = stage.fn.lower(*args).compile()
        return program

    def _planned(self, plan: StepPlan) -> StepPlan:
        """The plan with its attention layout replaced by the backend's metadata (host-side planning)."""
        return dataclasses.replace(
            plan, inputs=dataclasses.replace(plan.inputs, attention=self.backend.plan(plan.inputs.attention))
        )

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
            plans = [
                dataclasses.replace(
                    plans[0], inputs=dataclasses.replace(plans[0].inputs, prev_tokens=previous.outputs[0][0].token_ids)
                )
            ]
        carried: list = [None] * len(plans)
        outputs: list = [None] * len(plans)
        for tick in range(len(plans) + self.num_stages - 1):
            for s in reversed(range(self.num_stages)):  # later stages first: their inputs are already queued
                m = tick - s
                if not 0 <= m < len(plans):
                    continue
                stage, plan = self.stages[s], plans[m]
                inputs = plan.inputs
                if stage.last and not plan.uses_penalties:
                    history, is_output = self._empty_history[s]
                    sampling = dataclasses.replace(inputs.sampling, token_history=history, history_is_output=is_output)
                    inputs = dataclasses.replace(inputs, sampling=sampling)
                if self._multiprocess:
                    inputs = jax.device_put(inputs, self.replicated[s])
                x = None if stage.first else jax.device_put(carried[m], self.replicated[s])
                args = (stage.param_leaves, stage.kv_cache, x, inputs)
                stage.kv_cache, out = self._program(stage, plan.bucket, args)(*args)
                if stage.last:
                    outputs[m] = out
                else:
                    carried[m] = out
        return PendingStep(plans, outputs)

    def collect(self, pending: PendingStep) -> list[StepResult]:
        """Copies what the step's requests need to the host, in one transfer (the step's one sync)."""
        wanted = []
        for plan, (sampled, prompt) in zip(pending.plans, pending.outputs, strict=True):
            wanted.append(
                (
                    sampled.token_ids,
                    sampled.logprobs,
                    (sampled.top_ids, sampled.top_logprobs) if plan.wants_top_logprobs else None,
                    prompt if plan.prompt_rows else None,
                )
            )
        host = jax.device_get(jax.tree.map(_local_copy, wanted))
        return [
            StepResult(
                token_ids=ids,
                logprobs=lps,
                top_ids=None if top is None else top[0],
                top_logprobs=None if top is None else top[1],
                prompt_target_logprobs=None if prompt is None else prompt[0],
                prompt_top_ids=None if prompt is None else prompt[1],
                prompt_top_logprobs=None if prompt is None else prompt[2],
            )
            for ids, lps, top, prompt in host
        ]

    def params(self) -> dict[str, jax.Array]:
        """Flat param name -> the placed array (the owning stage's copy; stubs of other stages skipped)."""
        return {
            name: leaf
            for stage in self.stages
            for name, leaf in zip(stage.param_names, stage.param_leaves, strict=True)
            if leaf.ndim
        }
