#!/usr/bin/env python
"""Convert a Hugging Face checkpoint dir into a jserve Orbax checkpoint dir that ``LLM(model=OUT_DIR)`` loads.

Usage: python scripts/convert_checkpoint.py HF_DIR OUT_DIR [--dtype auto|bfloat16|float32|float16]
"""

from __future__ import annotations

import argparse

from jserve.checkpoint import load_hf_params, resolve_dtype, save_orbax
from jserve.config import ModelConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_pretrained(args.hf_dir)
    dtype = resolve_dtype(args.dtype, cfg)
    _, state = load_hf_params(args.hf_dir, cfg, dtype, use_tqdm=True)
    save_orbax(state, args.hf_dir, args.out_dir, dtype)
    print(f"wrote {args.out_dir} ({cfg.architecture}, {dtype})")


if __name__ == "__main__":
    main()
