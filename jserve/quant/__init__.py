"""Weight and KV-cache quantization.

config.py: the schemes (no jax import, so config parsing and ``launch --help`` stay light); weights.py: quantized
linear weights and their products (qwix); compressed_tensors.py: reading llm-compressor checkpoints; kv.py: int8 /
fp8 KV pages with per-token-and-head scales.
"""
