"""Regenerate the bundled default model, `jserve/assets/tiny-llama/`, deterministically.

A random (untrained) Llama with a sentencepiece tokenizer trained on `jserve/assets/corpus.txt`: big enough to
exercise every code path (GQA, tied embeddings, byte-fallback tokenization, a chat template), small enough to
ship in the package (< 5 MB) and to run anywhere. Its outputs are noise; it exists for smoke tests and demos.

    python scripts/make_tiny_model.py [--out DIR]

Running it again produces byte-identical files (same seed, same corpus, same library versions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "jserve" / "assets" / "tiny-llama"
VOCAB_SIZE = 1024
SEED = 0
MAX_ASSET_BYTES = 5 * 1024 * 1024

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def _import_tokenizer_utils():
    """The tokenizer helpers live with the tests (which use them too); make the repo root importable."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests import tokenizer_utils

    return tokenizer_utils


def write_model(out_dir: Path) -> None:
    """Write config.json, model.safetensors and generation_config.json for a seeded random Llama."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**MODEL_CONFIG)
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(out_dir, safe_serialization=True)


def write_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.model and tokenizer_config.json (with the default chat template)."""
    tokenizer_utils = _import_tokenizer_utils()
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = tokenizer_utils.train_sentencepiece(Path(tmp), vocab_size=VOCAB_SIZE)
        tokenizer_utils.write_hf_tokenizer_files(out_dir, sp_model, chat_template=tokenizer_utils.DEFAULT_CHAT_TEMPLATE)


def check(out_dir: Path) -> None:
    """Load the result with transformers, offline, and check its size."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    ids = tokenizer.encode("Hello, world! Grüße, 世界 🙂")
    assert ids[0] == 1 and max(ids) < VOCAB_SIZE, ids
    assert model.config.vocab_size == VOCAB_SIZE and model.config.tie_word_embeddings
    total = sum(f.stat().st_size for f in out_dir.iterdir())
    assert total < MAX_ASSET_BYTES, f"assets are {total} bytes"
    files = ", ".join(sorted(f.name for f in out_dir.iterdir()))
    print(f"wrote {out_dir} ({total / 1e6:.2f} MB): {files}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir: Path = args.out
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    write_model(out_dir)
    write_tokenizer(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors are written owner-only; the assets ship in the package
    check(out_dir)


if __name__ == "__main__":
    main()
