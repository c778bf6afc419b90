"""Tiny random Hugging Face checkpoints for every supported family, written with transformers."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 512  # matches the session sentencepiece model

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[type, type, dict]] = {
    # name: (config class, model class, overrides)
    "llama-gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama3-mqa": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            num_key_value_heads=1,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            rope_theta=500000.0,
        ),
    ),
    "llama-linear-rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=2.0), tie_word_embeddings=True),
    ),
    "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=16)),
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "gemma": (
        transformers.GemmaConfig,
        transformers.GemmaForCausalLM,
        dict(head_dim=32, num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh"),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    ),
    # head_dim 32 with 4 heads over hidden 64: not hidden / heads
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32)),
    "qwen3-moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            head_dim=32,
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],  # a dense layer between two sparse ones
        ),
    ),
    "qwen3-moe-unnormalized": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False),
    ),
    "gemma2": (  # alternating windowed / global layers; caps low enough that these random weights exceed them
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            head_dim=16,
            sliding_window=16,
            num_hidden_layers=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            initializer_range=0.25,  # raw scores and logits well past the caps (tests/models/test_families.py)
            attn_implementation="eager",  # transformers' sdpa path leaves the attention soft cap out
        ),
    ),
    "gemma3": (  # 5 windowed layers : 1 global, a local RoPE base, linear scaling on the global layer
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            head_dim=16,
            sliding_window=16,
            num_hidden_layers=6,
            query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    "phi3": (  # fused qkv / gate_up; longrope with a 32-token original context (the long prompt is past it)
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        dict(
            pad_token_id=0,
            original_max_position_embeddings=32,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.05 * i for i in range(8)],
                "long_factor": [1.5 + 0.3 * i for i in range(8)],
            },
        ),
    ),
}


def make_checkpoint(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides,
) -> tuple[Path, torch.nn.Module]:
    """Writes a random checkpoint of ``family`` to out_dir; returns (dir, the float32 torch model)."""
    config_cls, model_cls, family_overrides = FAMILIES[family]
    config = config_cls(**{**BASE, **family_overrides, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random init leaves some params tiny; widen them so families differ visibly
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return Path(out_dir), model.float()
