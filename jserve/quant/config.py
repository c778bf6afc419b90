"""What a quantized weight is: its storage type, its scale granularity, and whether activations are quantized.

One ``WeightQuant`` describes every quantized linear of a model. It comes from ``LLM(quantization=...)``
(quantize on load) or from a compressed-tensors checkpoint's ``quantization_config``.
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHT_METHODS = ("int8", "int4", "fp8")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
DEFAULT_GROUP_SIZE = 128

_STORAGE = {"int8": "int8", "int4": "int4", "fp8": "float8_e4m3fn"}  # names: this module imports no jax


@dataclass(frozen=True)
class WeightQuant:
    """method: "int8" | "int4" | "fp8". group_size: input-dim elements sharing one scale (None: one scale per
    output channel). fp8_activations: quantize each token's activations to e4m3 with its own absmax scale before
    the matmul (the FP8_DYNAMIC scheme; on CPU and GPUs without fp8 matmuls this is emulated in the compute dtype,
    so numerics match the checkpoint's)."""

    method: str
    group_size: int | None = None
    fp8_activations: bool = False

    def __post_init__(self):
        if self.method not in WEIGHT_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(WEIGHT_METHODS)}, got {self.method!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"quantization_group_size must be >= 1, got {self.group_size}")

    @property
    def storage_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(_STORAGE[self.method])

    def describe(self) -> str:
        scales = "per channel" if self.group_size is None else f"groups of {self.group_size}"
        acts = ", fp8 per-token activations" if self.fp8_activations else ""
        return f"{self.method} weights ({scales}{acts})"


def weight_quant_from_args(quantization: str | None, group_size: int | None) -> WeightQuant | None:
    """LLM(quantization=..., quantization_group_size=...) -> WeightQuant. int8 and fp8 are per output channel;
    int4 uses groups (default 128) because one scale per channel over a whole input row loses too much at 4 bits."""
    if quantization is None:
        if group_size is not None:
            raise ValueError("quantization_group_size is set but quantization is None")
        return None
    if quantization not in WEIGHT_METHODS:
        raise ValueError(f"quantization must be None or one of {', '.join(WEIGHT_METHODS)}, got {quantization!r}")
    if quantization != "int4":
        if group_size is not None:
            raise ValueError(f"quantization_group_size applies to int4 only (quantization={quantization!r})")
        return WeightQuant(quantization)
    return WeightQuant("int4", DEFAULT_GROUP_SIZE if group_size is None else group_size)


def kv_storage_dtype(kv_cache_dtype: str, model_dtype, platform: str):
    """The page dtype: the model's for "auto", else int8 / float8_e4m3fn (with per-token-and-head scales).
    A bfloat16 cache on CPU stores its values' bits as uint16 (``pallas_kernels.reference.BF16_BITS``: XLA:CPU
    scatters uint16 in place but not bfloat16). ``kv_cache_dtype`` is one of KV_CACHE_DTYPES (EngineArgs and
    CacheConfig validate it)."""
    import jax.numpy as jnp

    from pallas_kernels.reference import BF16_BITS

    if kv_cache_dtype == "auto":
        if platform == "cpu" and jnp.dtype(model_dtype) == jnp.dtype(jnp.bfloat16):
            return BF16_BITS
        return jnp.dtype(model_dtype)
    return jnp.dtype({"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[kv_cache_dtype])


def kv_value_dtype(storage_dtype):
    """The dtype a cache's values have (what users see): bfloat16 for pages stored as its bits."""
    import jax.numpy as jnp

    from pallas_kernels.reference import BF16_BITS

    return jnp.dtype(jnp.bfloat16) if jnp.dtype(storage_dtype) == BF16_BITS else jnp.dtype(storage_dtype)
