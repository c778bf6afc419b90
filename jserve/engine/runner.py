"""ModelRunner: params + physical KV pages + one compiled program per (stage, bucket shape).

With one pipeline stage (the common case) a step is one jit: forward -> logits of the sampled rows -> sampler,
KV pages donated, then one device-to-host copy. With ``pp`` stages, each stage owns a contiguous range of layers
and those layers' pages on its own tensor-parallel slice of devices; the engine splits a step into microbatches
(disjoint sets of sequences) and ``step()`` dispatches them in pipeline order:

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

import functools
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jserve import ops
from jserve.config import ModelConfig
from jserve.engine.batch import Buckets, StepInput, StepPlan
from jserve.engine.sampler import SamplerFlags, sample
from jserve.models.llama import KVCache, kv_cache_shape
from jserve.parallel import sharding as shard_rules


@dataclass
class StepResult:
    """Host copies of one step's outputs (rows follow StepPlan.sampled_ids / prompt_rows)."""

    token_ids: np.ndarray  # [S]
    logprobs: np.ndarray  # [S]
    top_ids: np.ndarray  # [S, k]
    top_logprobs: np.ndarray  # [S, k]
    prompt_target_logprobs: np.ndarray | None  # [T]
    prompt_top_ids: np.ndarray | None  # [T, k]
    prompt_top_logprobs: np.ndarray | None  # [T, k]


def _prompt_logprobs(logits: jax.Array, targets: jax.Array, k: int):
    """log_softmax over every row, the target token's logprob, and the top-k."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target_lp = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logprobs, k)
    return target_lp, top_ids.astype(jnp.int32), top_lp


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

    outputs: list
    new_keys: list | None  # shapes compiled by this step (for compile-time accounting)
    start: float


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
    fn: object = None


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
        buckets: Buckets,
        backend: ops.AttentionBackend,
        stage_meshes: list[Mesh] | None = None,
    ):
        self.config = cfg
        self.num_pages = num_pages
        self.page_size = page_size
        self.buckets = buckets
        self.backend = backend
        self.compile_seconds = 0.0
        self._compiled: set[tuple] = set()
        meshes = stage_meshes or [Mesh(np.asarray(jax.devices()[:1]), ("tp",))]
        ranges = split_layers(cfg.num_layers, len(meshes))
        self.stages: list[_Stage] = []
        for s, (mesh, layers) in enumerate(zip(meshes, ranges, strict=True)):
            stage = _Stage(layers, mesh, first=s == 0, last=s == len(meshes) - 1)
            st_state = jax.tree.map(lambda x: x, state)  # a copy: placement below must not touch the caller's
            if len(meshes) > 1:
                st_state = _stage_state(st_state, layers, stage.first, stage.last, cfg.tie_word_embeddings)
            shardings = shard_rules.param_shardings(st_state, cfg, mesh)
            flat = nnx.to_flat_state(st_state)
            for path, var in flat:
                name = "/".join(str(p) for p in path)
                target = shardings[name] if var.get_value().ndim else shard_rules.replicated(mesh)
                var.set_value(jax.device_put(var.get_value(), target))
            placed = nnx.from_flat_state(flat)
            with_paths, treedef = jax.tree_util.tree_flatten_with_path(placed)
            stage.param_leaves = [leaf for _, leaf in with_paths]
            stage.param_names = [
                "/".join(
                    str(getattr(k, "key", getattr(k, "idx", k)))
                    for k in path
                    if not str(getattr(k, "name", "")) == "value"
                )
                for path, _ in with_paths
            ]
            stage.kv_sharding = NamedSharding(mesh, shard_rules.kv_cache_spec(cfg, mesh))
            shape = kv_cache_shape(cfg, num_pages, page_size)
            zeros = jax.jit(functools.partial(jnp.zeros, shape, kv_dtype), out_shardings=stage.kv_sharding)
            stage.kv_cache = [(zeros(), zeros()) for _ in layers]
            # NOTE: params travel as a flat tuple of arrays; re-flattening an nnx.State per call costs ms.
            stage.fn = jax.jit(
                functools.partial(
                    self._stage_step,
                    graphdef,
                    treedef,
                    backend.replace(mesh=mesh) if mesh.devices.size > 1 else backend,
                    layers,
                    stage.first,
                    stage.last,
                    stage.kv_sharding,
                ),
                # (param_leaves, kv_cache, x, inputs, flags, num_prompt_logprobs): the step's inputs are pinned
                # replicated, so numpy inputs passed straight in compile exactly like device_put ones
                in_shardings=(None, None, None, shard_rules.replicated(mesh)),
                static_argnums=(4, 5),
                donate_argnums=(1,),
            )
            self.stages.append(stage)
        self.replicated = [shard_rules.replicated(st.mesh) for st in self.stages]
        # NOTE: in one process the step's numpy inputs go straight into the jitted call, whose C++ path places
        # them by its pinned in_shardings (~0.3 ms a step); jax.device_put of the same ~20 small arrays costs
        # ~1.5 ms of host time. A multi-host mesh needs global arrays, so there they are put explicitly.
        self._multiprocess = jax.process_count() > 1

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
        param_leaves,
        kv_cache,
        x,
        inputs: StepInput,
        flags: SamplerFlags,
        num_prompt_logprobs: int,
    ):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, param_leaves))
        if first:
            x = model.embed(inputs.tokens)
        x, kv_cache = model.run_layers(x, inputs.positions, kv_cache, inputs.meta, backend, layers)
        kv_cache = [tuple(jax.lax.with_sharding_constraint(a, kv_sharding) for a in kv) for kv in kv_cache]
        if not last:
            return kv_cache, x
        hidden = model.final_norm(x)
        sampled = sample(model.logits(hidden[inputs.logits_indices]), inputs.sampling, flags)
        prompt = None
        if num_prompt_logprobs:
            prompt = _prompt_logprobs(model.logits(hidden), inputs.prompt_targets, num_prompt_logprobs)
        # replicated results: every process of a multi-host mesh can read them
        return kv_cache, jax.lax.with_sharding_constraint(
            (sampled, prompt), jax.sharding.NamedSharding(kv_sharding.mesh, jax.sharding.PartitionSpec())
        )

    def step(self, plans: list[StepPlan]) -> list[StepResult]:
        """Runs microbatches through the stages in pipeline order; one device->host copy at the end."""
        return self.collect(self.dispatch(plans))

    def dispatch(self, plans: list[StepPlan]) -> PendingStep:
        """Queues the step's programs and returns at once (JAX dispatch is asynchronous), so the caller can
        dispatch other replicas' steps before waiting on this one in ``collect``."""
        start = time.perf_counter()
        keys = [(p.shape_key, p.flags, p.num_prompt_logprobs) for p in plans]
        first_time = any(k not in self._compiled for k in keys)
        carried: list = [None] * len(plans)
        outputs: list = [None] * len(plans)
        for tick in range(len(plans) + self.num_stages - 1):
            for s in reversed(range(self.num_stages)):  # later stages first: their inputs are already queued
                m = tick - s
                if not 0 <= m < len(plans):
                    continue
                stage, plan = self.stages[s], plans[m]
                inputs = jax.device_put(plan.inputs, self.replicated[s]) if self._multiprocess else plan.inputs
                x = None if stage.first else jax.device_put(carried[m], self.replicated[s])
                stage.kv_cache, out = stage.fn(
                    stage.param_leaves,
                    stage.kv_cache,
                    x,
                    inputs,
                    plan.flags,
                    plan.num_prompt_logprobs,
                )
                if stage.last:
                    outputs[m] = out
                else:
                    carried[m] = out
        return PendingStep(outputs, keys if first_time else None, start)

    def collect(self, pending: PendingStep) -> list[StepResult]:
        outputs = jax.device_get(jax.tree.map(_local_copy, pending.outputs))  # NOTE: the step's one copy to host
        if pending.new_keys is not None:
            self._compiled.update(pending.new_keys)
            self.compile_seconds += time.perf_counter() - pending.start
        return [self._result(sampled, prompt) for sampled, prompt in outputs]

    @staticmethod
    def _result(sampled, prompt) -> StepResult:
        return StepResult(
            token_ids=sampled.token_ids,
            logprobs=sampled.logprobs,
            top_ids=sampled.top_ids,
            top_logprobs=sampled.top_logprobs,
            prompt_target_logprobs=None if prompt is None else prompt[0],
            prompt_top_ids=None if prompt is None else prompt[1],
            prompt_top_logprobs=None if prompt is None else prompt[2],
        )

    def params(self) -> dict[str, jax.Array]:
        """Flat param name -> the placed array (the owning stage's copy; stubs of other stages skipped)."""
        return {
            name: leaf
            for stage in self.stages
            for name, leaf in zip(stage.param_names, stage.param_leaves, strict=True)
            if leaf.ndim
        }

    @property
    def compiled_shapes(self) -> int:
        return len(self._compiled)
