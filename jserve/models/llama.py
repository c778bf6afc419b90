"""The Llama family as one decoder configured by flags: Llama 2/3, Mistral, Qwen2, Gemma, and Mixtral (MoE MLP).

A forward pass runs a ragged batch of new tokens (prefill chunks and decode tokens of many sequences, packed
into [T]) through all layers, writing their K/V into each layer's pages. Layers are unrolled: each keeps its own
KV buffers, which the jitted step donates and XLA updates in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jserve.attention import AttentionBackend
from jserve.config import ModelConfig
from jserve.models.attention import Attention
from jserve.models.layers import MLP, Embedding, RMSNorm, param, rope_inverse_frequencies
from jserve.models.mixtral import MoE
from jserve.quant.kv import kv_bytes_per_token

KVCache = list[tuple[jax.Array, ...]]
"""Per layer: (k_pages, v_pages), each [K, P, L, H]; int8 / fp8 pages add (k_scales, v_scales), each [K, P, L]."""


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, unit_offset=cfg.norm_unit_offset, dtype=dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, layer_idx, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MoE(cfg, dtype=dtype, rngs=rngs) if cfg.is_moe else MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, inv_freq, kv, meta, backend):
        attn_out, kv = self.attn(self.input_norm(x), positions, inv_freq, kv, meta, backend)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return x, kv


class CausalLM(nnx.Module):
    """Embedding -> N decoder layers -> final norm; ``logits`` applies the LM head to chosen rows only."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embedding(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, unit_offset=cfg.norm_unit_offset, dtype=dtype, rngs=rngs
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def __call__(
        self,
        tokens: jax.Array,  # [T]
        positions: jax.Array,  # [T]
        kv_cache: KVCache,
        meta,
        backend: AttentionBackend,
    ) -> tuple[jax.Array, KVCache]:
        """Returns final hidden states [T, D] and the updated per-layer pages."""
        x = self.embed(tokens)
        x, kv_cache = self.run_layers(x, positions, kv_cache, meta, backend, range(self.config.num_layers))
        return self.final_norm(x), kv_cache

    def run_layers(
        self,
        x: jax.Array,
        positions: jax.Array,
        kv_cache: KVCache,
        meta,
        backend: AttentionBackend,
        layers: range,
    ) -> tuple[jax.Array, KVCache]:
        """Runs a contiguous range of layers (a pipeline stage); kv_cache holds exactly those layers' pages."""
        cfg = self.config
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # folded by XLA
        new_cache = []
        for i, kv in zip(layers, kv_cache, strict=True):
            x, kv = self.layers[i](x, positions, inv_freq, kv, meta, backend)
            new_cache.append(kv)
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:  # [B, D] -> [B, V] float32
        if self.config.tie_word_embeddings:
            return self.embed.attend(hidden)
        return jnp.einsum("bd,dv->bv", hidden, self.lm_head[...], preferred_element_type=jnp.float32)


def kv_cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    return (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)


def kv_cache_bytes_per_page(cfg: ModelConfig, page_size: int, dtype) -> int:
    """K and V bytes of one page summed over all layers, scales included (sizes the pool from free memory)."""
    return page_size * kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
