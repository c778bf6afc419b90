"""ModelRunner: params + physical KV pages + one compiled step per bucket shape.

``step()`` runs model forward -> logits of the sampled rows -> sampler in one jit with the KV pages donated,
then makes one device-to-host copy of the results.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jserve import ops
from jserve.config import ModelConfig
from jserve.engine.batch import Buckets, StepInput, StepPlan
from jserve.engine.sampler import SamplerFlags, SamplerOutput, sample
from jserve.models.llama import KVCache, init_kv_cache


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


class ModelRunner:
    """Owns the device state; the engine hands it StepPlans."""

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
        kv_sharding=None,
        batch_sharding=None,
    ):
        self.config = cfg
        self.graphdef = graphdef
        self.state = state
        self.num_pages = num_pages
        self.page_size = page_size
        self.buckets = buckets
        self.backend = backend
        self.batch_sharding = batch_sharding
        self.kv_cache: KVCache = init_kv_cache(cfg, num_pages, page_size, kv_dtype, kv_sharding)
        self.compile_seconds = 0.0
        self._compiled: set[tuple] = set()
        # NOTE: params travel as a flat tuple of arrays; re-flattening the nnx.State on every call costs ms.
        self.param_leaves, self._param_treedef = jax.tree.flatten(state)
        self._step_fn = jax.jit(
            functools.partial(self._step, graphdef, self._param_treedef, backend),
            static_argnames=("flags", "num_prompt_logprobs"),
            donate_argnums=(1,),
        )

    @staticmethod
    def _step(graphdef, treedef, backend, param_leaves, kv_cache, inputs: StepInput, flags: SamplerFlags,
              num_prompt_logprobs: int):
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, param_leaves))
        hidden, kv_cache = model(inputs.tokens, inputs.positions, kv_cache, inputs.meta, backend)
        logits = model.logits(hidden[inputs.logits_indices])
        sampled: SamplerOutput = sample(logits, inputs.sampling, flags)
        prompt = None
        if num_prompt_logprobs:
            prompt = _prompt_logprobs(model.logits(hidden), inputs.prompt_targets, num_prompt_logprobs)
        return kv_cache, (sampled, prompt)

    def step(self, plan: StepPlan) -> StepResult:
        key = (plan.shape_key, plan.flags, plan.num_prompt_logprobs)
        first = key not in self._compiled
        start = time.perf_counter()
        inputs = jax.device_put(plan.inputs, self.batch_sharding) if self.batch_sharding else plan.inputs
        self.kv_cache, (sampled, prompt) = self._step_fn(
            self.param_leaves, self.kv_cache, inputs, flags=plan.flags, num_prompt_logprobs=plan.num_prompt_logprobs
        )
        sampled, prompt = jax.device_get((sampled, prompt))  # NOTE: the step's one device->host copy
        if first:
            self._compiled.add(key)
            self.compile_seconds += time.perf_counter() - start
        return StepResult(
            token_ids=sampled.token_ids,
            logprobs=sampled.logprobs,
            top_ids=sampled.top_ids,
            top_logprobs=sampled.top_logprobs,
            prompt_target_logprobs=None if prompt is None else prompt[0],
            prompt_top_ids=None if prompt is None else prompt[1],
            prompt_top_logprobs=None if prompt is None else prompt[2],
        )

    @property
    def compiled_shapes(self) -> int:
        return len(self._compiled)
