"""Frozen, validated configuration objects. Each component takes only the config it needs.

``ModelConfig`` is built from a Hugging Face ``config.json``; it covers the Llama family (Llama 2/3, Mistral,
Qwen2/3, Gemma 1-3, Phi-3) and the MoE models (Mixtral, Qwen3-MoE), which differ only in the flags below.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from jserve.quant.config import KV_CACHE_DTYPES, WeightQuant

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "MixtralForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling as in HF ``rope_scaling`` / ``rope_parameters``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope (Phi-3): per-frequency divisors for sequences up to / past original_max_position_embeddings, and
    # the cos/sin scale (default sqrt(1 + ln(max_len / original) / ln(original)))
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of one decoder-only model."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    attention_bias: bool = False  # q/k/v bias (Qwen2, some Llamas)
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # "silu" | "gelu_pytorch_tanh" | "gelu"
    tie_word_embeddings: bool = False
    norm_unit_offset: bool = False  # Gemma: RMSNorm multiplies by (1 + w)
    embed_scale: bool = False  # Gemma: embeddings scaled by sqrt(hidden_size)
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    num_experts: int = 0  # Mixtral: experts per MoE layer (0 = dense MLP)
    num_experts_per_tok: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # the checkpoint's dtype name
    weight_quant: WeightQuant | None = None  # quantized linears: from the checkpoint or LLM(quantization=...)
    checkpoint_quant_format: str | None = None  # compressed-tensors format of a pre-quantized checkpoint
    early_exit_layer: int | None = None  # trained for self-speculation: layers whose output the LM head reads
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each q and k head before RoPE
    sandwich_norms: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too, and before the MLP
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: the LM head's logits likewise
    query_pre_attn_scalar: float | None = None  # Gemma 2/3: softmax scale is this ** -0.5 (else head_dim ** -0.5)
    # Gemma 3: sliding-window layers rotate with their own base and scaling (None: the global ones)
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling | None = None
    moe_intermediate_size: int | None = None  # Qwen3-MoE: an expert's width (None: intermediate_size)
    norm_topk_prob: bool = True  # MoE: renormalise the top-k router weights (Mixtral always; Qwen3-MoE by config)
    dense_layers: tuple[int, ...] = ()  # MoE models: layers with a dense MLP (Qwen3-MoE mlp_only_layers etc.)
    fused_projections: bool = False  # Phi-3 checkpoints: qkv_proj and gate_up_proj (split on load)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architectures: {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling: type {self.rope_scaling.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported")
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError("sliding_windows needs one entry per layer")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError("num_experts_per_tok must be in [1, num_experts]")
        if self.fused_projections and self.checkpoint_quant_format is not None:
            raise ValueError(
                "quantization_config: compressed-tensors checkpoints with fused projections (Phi-3's qkv_proj / "
                "gate_up_proj) are not supported; load the dense checkpoint with quantization= instead"
            )
        for scaling in (self.rope_scaling, self.local_rope_scaling):
            if scaling is not None and scaling.rope_type == "longrope":
                half = self.head_dim // 2
                if len(scaling.short_factor) != half or len(scaling.long_factor) != half:
                    raise ValueError(
                        f"rope_scaling: longrope needs short_factor and long_factor of head_dim / 2 = {half} entries"
                    )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_layers

    @property
    def expert_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling]:
        """(base, scaling) of a layer's RoPE: Gemma 3's sliding layers have their own."""
        if self.sliding_windows[layer] is not None and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling or RopeScaling()
        return self.rope_theta, self.rope_scaling

    @property
    def sm_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"model: no config.json in {os.fspath(path)!r}")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Translates a HF ``config.json`` dict (transformers 4.x or 5.x spelling)."""
        arch = _architecture(hf)
        model_type = hf.get("model_type", "")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // num_heads
        num_layers = hf["num_hidden_layers"]
        is_gemma = arch in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
        is_qwen2 = model_type == "qwen2" or arch == "Qwen2ForCausalLM"
        rope_theta, rope_scaling, local_theta, local_scaling = _rope(hf, arch == "Gemma3ForCausalLM")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor: only 1.0 (RoPE over the whole head) is supported")
        windows = _sliding_windows(hf, num_layers, is_qwen2, arch)
        num_experts = hf.get("num_local_experts", 0) or hf.get("num_experts", 0) or 0
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if is_gemma and act == "gelu":
            act = "gelu_pytorch_tanh"  # Gemma checkpoints say "gelu" but were trained with the tanh approximation
        weight_quant, quant_format = _weight_quant(hf)
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=bool(hf.get("attention_bias", False)) or is_qwen2,
            o_bias=bool(hf.get("attention_bias", False)) and not is_qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=act,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", is_gemma)),
            norm_unit_offset=is_gemma,
            embed_scale=is_gemma,
            sliding_windows=windows,
            num_experts=num_experts,
            num_experts_per_tok=hf.get("num_experts_per_tok", 0) or 0,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            sandwich_norms=arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"),
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            local_rope_theta=local_theta,
            local_rope_scaling=local_scaling,
            moe_intermediate_size=hf.get("moe_intermediate_size"),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            dense_layers=_dense_layers(hf, num_layers) if num_experts else (),
            fused_projections=arch == "Phi3ForCausalLM",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            weight_quant=weight_quant,
            checkpoint_quant_format=quant_format,
            early_exit_layer=hf.get("early_exit_layer"),
        )


def _architecture(hf: dict[str, Any]) -> str:
    """config.json's first architecture, if jserve runs it (else ValueError naming the field)."""
    archs = hf.get("architectures") or []
    if not archs:
        raise ValueError(f"architectures: missing in config.json; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architectures: {archs[0]!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return archs[0]


def _weight_quant(hf: dict[str, Any]) -> tuple[WeightQuant | None, str | None]:
    """(weight quantization, checkpoint format) of a quantized checkpoint's ``quantization_config``, else Nones."""
    if not hf.get("quantization_config"):
        return None, None
    from jserve.quant.compressed_tensors import parse_quantization_config

    return parse_quantization_config(hf["quantization_config"])


def _rope_scaling(params: dict[str, Any], hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    """(base, scaling) from one HF rope dict (``rope_parameters`` or the older ``rope_scaling``)."""
    rope = dict(params)
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default")) or "default"
    if rope_type == "longrope":
        original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
        if not original:
            raise ValueError("rope_scaling: longrope needs original_max_position_embeddings")
        rope["original_max_position_embeddings"] = original
        for key in ("short_factor", "long_factor"):
            rope[key] = tuple(float(x) for x in rope.get(key) or ())
        if rope.get("attention_factor") is None:  # transformers' default, from the context extension
            factor = rope.get("factor") or hf.get("max_position_embeddings", original) / original
            rope["attention_factor"] = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    return theta, RopeScaling(rope_type=rope_type, **{k: v for k, v in rope.items() if k in known and v is not None})


def _rope(hf: dict[str, Any], is_gemma3: bool) -> tuple[float, RopeScaling, float | None, RopeScaling | None]:
    """Global (base, scaling) and, for Gemma 3, its sliding layers' own (transformers 4.x and 5.x spellings)."""
    params = hf.get("rope_parameters") or {}
    if is_gemma3 and "full_attention" in params:  # transformers 5: one rope dict per layer type
        theta, scaling = _rope_scaling(params["full_attention"], hf)
        local_theta, local_scaling = _rope_scaling(params.get("sliding_attention") or {}, hf)
        return theta, scaling, local_theta, local_scaling
    merged = {**(hf.get("rope_scaling") or {}), **params}
    theta, scaling = _rope_scaling(merged, hf)
    if is_gemma3:  # transformers 4: rope_local_base_freq, default scaling on the sliding layers
        return theta, scaling, float(hf.get("rope_local_base_freq", 10000.0)), RopeScaling()
    return theta, scaling, None, None


def _dense_layers(hf: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """MoE layers that keep a dense MLP: Qwen3-MoE's ``mlp_only_layers`` and those off ``decoder_sparse_step``."""
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or ())
    return tuple(i for i in range(num_layers) if i in only or (i + 1) % step)


def _sliding_windows(hf: dict[str, Any], num_layers: int, is_qwen2: bool, arch: str) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if not layer_types and window and arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        # configs from before layer_types: Gemma 2 alternates from a sliding layer, Gemma 3 has every
        # sliding_window_pattern-th layer global
        pattern = 2 if arch == "Gemma2ForCausalLM" else int(hf.get("sliding_window_pattern", 6))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if is_qwen2:
        if not hf.get("use_sliding_window", False) or not window:
            return (None,) * num_layers
        first = hf.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window or None,) * num_layers


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Paged KV cache: fixed pool of ``num_pages`` pages of ``page_size`` tokens (page 0 is the null page)."""

    page_size: int = 16
    num_pages: int | None = None  # None: sized from free device memory
    memory_fraction: float = 0.5  # share of free device memory the KV cache may take when num_pages is None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a positive power of two, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {self.num_pages}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Device layout: data-parallel replicas x pipeline stages x tensor-parallel shards (= the device count)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def check_model(self, cfg: ModelConfig) -> None:
        """Raises ValueError when the model cannot be split this way."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if cfg.num_heads % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide num_attention_heads {cfg.num_heads}")
        if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide num_key_value_heads {cfg.num_kv_heads} or be a multiple of it"
            )
        if cfg.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide intermediate_size {cfg.intermediate_size}")
        if cfg.num_experts and cfg.num_experts % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide num_local_experts {cfg.num_experts}")
        if pp > cfg.num_layers:
            raise ValueError(f"pipeline_parallel_size {pp} must be <= num_hidden_layers {cfg.num_layers}")
