"""Self-attention over the paged KV cache: project q/k/v, rotate, write K/V into pages, attend, project out.

GQA/MQA never repeat K/V: the backend groups query heads per KV head.
"""

from __future__ import annotations

import jax
from flax import nnx

from jserve.attention import AttentionBackend
from jserve.config import ModelConfig
from jserve.lora.targets import LayerLoRA
from jserve.models.layers import RMSNorm, apply_rope, linear_weight, param
from jserve.quant.weights import QuantizedWeight, dense_einsum, einsum


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        quant = cfg.weight_quant
        self.q_proj = linear_weight(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype, quant, name="q_proj")
        self.k_proj = linear_weight(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype, quant, name="k_proj")
        self.v_proj = linear_weight(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype, quant, name="v_proj")
        self.o_proj = linear_weight(
            rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype, quant, num_contracting=2, name="o_proj"
        )
        self.qkv_bias = cfg.attention_bias
        self.o_bias = cfg.o_bias
        if cfg.attention_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = param(rngs, (n, h), ("q_heads", "head_dim"), dtype, zeros)
            self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, zeros)
            self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, zeros)
        if cfg.o_bias:
            self.o_bias_param = param(rngs, (d,), ("embed",), dtype, nnx.initializers.zeros)
        if cfg.qk_norm:  # Qwen3 / Gemma 3: each head normalised over head_dim before RoPE
            norm = dict(eps=cfg.rms_norm_eps, unit_offset=cfg.norm_unit_offset, dtype=dtype, rngs=rngs)
            self.q_norm = RMSNorm(h, **norm, axis="head_dim")
            self.k_norm = RMSNorm(h, **norm, axis="head_dim")
        self.qk_norm = cfg.qk_norm
        self.sm_scale = cfg.sm_scale
        self.soft_cap = cfg.attn_logit_softcap
        self.sliding_window = cfg.sliding_windows[layer_idx]

    def __call__(
        self,
        x: jax.Array,  # [T, D]
        rope: tuple[jax.Array, jax.Array],  # this layer's (cos, sin) [T, H/2]
        kv: tuple[jax.Array, ...],  # this layer's pages [K, P, L, H] (+ scales [K, P, L] when quantized)
        meta,  # the backend's metadata for this step (AttentionBackend.plan)
        backend: AttentionBackend,
        lora: LayerLoRA | None = None,  # adapter slots (multi-LoRA): each token's low-rank update
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        # NOTE: the named scopes label the step's parts for scripts/profile_step.py (XLA op metadata)
        with jax.named_scope("qkv_proj"):
            q = einsum("td,dnh->tnh", x, self.q_proj)
            k = einsum("td,dkh->tkh", x, self.k_proj)
            v = einsum("td,dkh->tkh", x, self.v_proj)
            if self.qkv_bias:
                q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
            if lora is not None:
                q, k, v = lora.add("q_proj", x, q), lora.add("k_proj", x, k), lora.add("v_proj", x, v)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        with jax.named_scope("kv_write"):
            kv = backend.write_kv(kv, k, v, meta)
        with jax.named_scope("attention"):
            out = backend.attend(
                q, kv, meta, sm_scale=self.sm_scale, sliding_window=self.sliding_window, soft_cap=self.soft_cap
            )
        with jax.named_scope("o_proj"):
            projected = self._project_out(out)
            if self.o_bias:
                projected = projected + self.o_bias_param[...]
            if lora is not None:
                projected = lora.add("o_proj", out, projected)
        return projected, kv

    def _project_out(self, out: jax.Array) -> jax.Array:  # [T, N, H] -> [T, D]
        """A dense o_proj runs as one [T, N*H] x [N*H, D] matmul: as a two-dim contraction XLA:CPU laid the
        [N, H, D] weight out anew (a transposed copy of it) in every step."""
        if isinstance(self.o_proj, QuantizedWeight):
            return einsum("tnh,nhd->td", out, self.o_proj)
        weight = self.o_proj[...]
        return dense_einsum("tm,md->td", out.reshape(out.shape[0], -1), weight.reshape(-1, weight.shape[-1]))
