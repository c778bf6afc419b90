"""The Llama family as one decoder configured by flags: Llama 2/3, Mistral, Qwen2/3, Gemma 1-3, Phi-3, and the
MoE models (Mixtral, Qwen3-MoE).

A forward pass runs a ragged batch of new tokens (prefill chunks and decode tokens of many sequences, packed
into [T]) through all layers, writing their K/V into each layer's pages. The pages of all layers of a stage
are one buffer (layer-major page ids, see ``AttentionBackend.for_layer``), which the jitted step donates and
XLA updates in place. Layers run unrolled, or in a loop over stacked params (``layer_stack``), which makes a
program's trace and compile cost independent of depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jserve.attention import AttentionBackend
from jserve.config import ModelConfig
from jserve.lora.targets import LayerLoRA, StepLoRA
from jserve.models.attention import Attention
from jserve.models.layer_stack import StackedLayers, run_stacked
from jserve.models.layers import MLP, Embedding, RMSNorm, param, rope_tables
from jserve.models.mixtral import MoE
from jserve.quant.kv import kv_bytes_per_token
from jserve.quant.weights import dense_einsum

KVCache = tuple[jax.Array, ...]
"""(k_pages, v_pages), each [K, N * P, L, H] for N layers of P pages (layer j: pages j * P ... (j + 1) * P - 1);
int8 / fp8 pages add (k_scales, v_scales), each [K, N * P, L]."""


class DecoderLayer(nnx.Module):
    """Pre-norm residual block. ``post_attn_norm`` is the norm before the MLP (HF's ``post_attention_layernorm``
    for Llama, ``pre_feedforward_layernorm`` for Gemma 2/3); Gemma's sandwich norms also normalise the attention
    and MLP outputs before each residual add (``attn_out_norm``, ``mlp_out_norm``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, unit_offset=cfg.norm_unit_offset, dtype=dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, layer_idx, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.sandwich = cfg.sandwich_norms
        if cfg.sandwich_norms:
            self.attn_out_norm = RMSNorm(cfg.hidden_size, **norm)
            self.mlp_out_norm = RMSNorm(cfg.hidden_size, **norm)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, rope, kv, meta, backend, lora: LayerLoRA | None = None):
        attn_out, kv = self.attn(self.input_norm(x), rope, kv, meta, backend, lora)
        if self.sandwich:
            attn_out = self.attn_out_norm(attn_out)
        x = x + attn_out
        with jax.named_scope("mlp"):
            normed = self.post_attn_norm(x)
            mlp_out = self.mlp(normed) if isinstance(self.mlp, MoE) else self.mlp(normed, lora)
        if self.sandwich:
            mlp_out = self.mlp_out_norm(mlp_out)
        return x + mlp_out, kv


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
        """Returns final hidden states [T, D] and the updated pages."""
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
        rope_lens: jax.Array | None = None,
        *,
        kv_layers: range | None = None,
        stacked: StackedLayers | None = None,
        lora: StepLoRA | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs a contiguous range of layers (a pipeline stage, or early exit's first layers).

        ``kv_cache`` holds the pages of ``kv_layers`` (default: ``layers``). ``stacked``: the layers' params
        stacked (run in a loop; this model's own layers are then stubs), else the layers run unrolled.
        ``rope_lens`` [T]: each token's sequence length for longrope (Phi-3); None: its row's length after this
        step (drafting, where no prompt length is at hand). ``lora``: the adapter slots of ``kv_layers`` and
        each token's slot (multi-LoRA)."""
        cfg = self.config
        kv_layers = layers if kv_layers is None else kv_layers
        pages_per_layer = kv_cache[0].shape[1] // len(kv_layers)
        ropes = {cfg.layer_rope(i) for i in layers}
        seq_lens = None
        if any(scaling.rope_type == "longrope" for _, scaling in ropes):
            seq_lens = rope_lens
            if seq_lens is None:
                seq_lens = _token_sequence_lengths(backend.layout_of(meta), positions.shape[0])
        tables = {rope: rope_tables(positions, seq_lens, cfg.head_dim, *rope) for rope in ropes}  # once per step

        def run_layer(layer, i, like: int, carry):
            x, kv = carry
            layer_meta = backend.for_layer(meta, (i - kv_layers.start) * pages_per_layer)
            layer_lora = None if lora is None else lora.layer(i - kv_layers.start)
            return layer(x, tables[cfg.layer_rope(like)], kv, layer_meta, backend, layer_lora)

        if stacked is None:
            carry = (x, tuple(kv_cache))
            for i in layers:
                carry = run_layer(self.layers[i], i, i, carry)
            return carry
        graphdefs = [nnx.graphdef(self.layers[stacked.stack.start + r]) for r in range(stacked.stack.period)]
        return run_stacked(graphdefs, stacked, layers, (x, tuple(kv_cache)), run_layer)

    @jax.named_scope("lm_head")
    def logits(self, hidden: jax.Array) -> jax.Array:  # [B, D] -> [B, V] float32
        if self.config.tie_word_embeddings:
            logits = self.embed.attend(hidden)
        else:
            logits = dense_einsum("bd,dv->bv", hidden, self.lm_head[...], out_dtype=jnp.float32)
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)


def _token_sequence_lengths(layout, num_tokens: int) -> jax.Array:
    """[T] the length of each token's sequence with this step's tokens (its row's kv_len; padding: 0)."""
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    row = jnp.searchsorted(layout.cu_q_lens[1:], token, side="right")
    real = token < layout.cu_q_lens[layout.num_seqs[0]]
    return jnp.where(real, layout.kv_lens[jnp.minimum(row, layout.kv_lens.shape[0] - 1)], 0)


def kv_cache_shape(cfg: ModelConfig, num_pages: int, page_size: int, num_layers: int) -> tuple[int, int, int, int]:
    """The K (or V) pages of ``num_layers`` layers of ``num_pages`` pages each, in one buffer."""
    return (cfg.num_kv_heads, num_layers * num_pages, page_size, cfg.head_dim)


def kv_cache_bytes_per_page(cfg: ModelConfig, page_size: int, dtype) -> int:
    """K and V bytes of one page summed over all layers, scales included (sizes the pool from free memory)."""
    return page_size * kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
