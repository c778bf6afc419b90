"""The sparse MoE block of Mixtral and Qwen3-MoE: a softmax router picks the top-k experts per token (their
weights renormalised to sum to 1 unless ``norm_topk_prob`` is off, as Qwen3-MoE configs may say).

Tokens are sorted by expert and each expert's rows go through a grouped matmul (``jax.lax.ragged_dot``), so only
the chosen experts' FLOPs are spent and no [T, E, F] tensor is built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jserve.config import ModelConfig
from jserve.models.layers import activation, linear_weight, param
from jserve.quant.weights import ragged_dot


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f, e = cfg.hidden_size, cfg.expert_size, cfg.num_experts
        self.router = param(rngs, (d, e), ("embed", None), dtype)
        expert = dict(quant=cfg.weight_quant, leading_batch=True)
        self.gate_proj = linear_weight(rngs, (e, d, f), ("experts", "embed", "mlp"), dtype, name="gate_proj", **expert)
        self.up_proj = linear_weight(rngs, (e, d, f), ("experts", "embed", "mlp"), dtype, name="up_proj", **expert)
        self.down_proj = linear_weight(rngs, (e, f, d), ("experts", "mlp", "embed"), dtype, name="down_proj", **expert)
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.num_experts = e
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D] -> [T, D]
        num_tokens = x.shape[0]
        router_logits = jnp.einsum("td,de->te", x, self.router[...], preferred_element_type=jnp.float32)
        weights, experts = jax.lax.top_k(jax.nn.softmax(router_logits, axis=-1), self.top_k)  # [T, k]
        if self.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights.astype(x.dtype)

        flat_experts = experts.reshape(-1)  # [T*k]
        order = jnp.argsort(flat_experts, stable=True)
        token_of_row = order // self.top_k
        group_sizes = jnp.bincount(flat_experts, length=self.num_experts).astype(jnp.int32)
        rows = x[token_of_row]  # [T*k, D], grouped by expert
        gate = ragged_dot(rows, self.gate_proj, group_sizes)
        up = ragged_dot(rows, self.up_proj, group_sizes)
        out_rows = ragged_dot(self.act(gate) * up, self.down_proj, group_sizes)  # [T*k, D]

        row_weights = weights.reshape(-1)[order][:, None]
        return jnp.zeros((num_tokens, x.shape[1]), x.dtype).at[token_of_row].add(out_rows * row_weights)
