"""Held-out perplexity of a model on the Python standard library, through jserve's public API.

    python scripts/eval_perplexity.py jserve/assets/tiny-pycoder [--reference] [--max-files N]
    python scripts/eval_perplexity.py MODEL --quantization int8 --kv-cache-dtype int8

The held-out files are those ``jserve.stdlib_corpus`` sets aside (never trained on). Each file is tokenized with
the model's tokenizer as ``[BOS] + ids + [EOS]`` and cut into windows of ``--window`` tokens (default 256, the
length the bundled model was trained on); jserve scores every window with ``prompt_logprobs``, batched
through the engine.
``--reference`` scores the same windows with transformers. A bigram model estimated on the training split
scores the same tokens, so the ratio says what the model learned beyond bigrams.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from jserve.perplexity import BigramModel, file_windows, llm_perplexity, reference_perplexity  # noqa: E402
from jserve.stdlib_corpus import corpus_files, read_source  # noqa: E402


def tokenize(tokenizer, files: list[Path]) -> list[list[int]]:
    """Each file as [BOS] + ids + [EOS], with the model's own tokenizer."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_ids[0]
    return [[bos, *tokenizer.encode(read_source(p), add_special_tokens=False), eos] for p in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint directory")
    parser.add_argument("--corpus", type=Path, default=None, help="directory of *.py files (default: the stdlib)")
    parser.add_argument("--max-files", type=int, default=None, help="only the first N held-out files")
    parser.add_argument("--window", type=int, default=256, help="tokens per window (the training length)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default=None, help="int8 | int4 | fp8 (quantize on load)")
    parser.add_argument("--quantization-group-size", type=int, default=None, help="int4 group size (default 128)")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--reference", action="store_true", help="also transformers' perplexity on the same windows")
    parser.add_argument("--no-bigram", action="store_true", help="skip the bigram baseline (it reads the train split)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args()

    from jserve import LLM

    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_model_len=args.window + 1,  # a prompt leaves room for one generated token
        quantization=args.quantization,
        quantization_group_size=args.quantization_group_size,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    window = args.window
    heldout = corpus_files(args.corpus, split="heldout")[: args.max_files]
    windows = [w for ids in tokenize(llm.tokenizer, heldout) for w in file_windows(ids, window)]
    print(f"{len(heldout)} held-out files, {len(windows)} windows of <= {window} tokens", file=sys.stderr)

    began = time.perf_counter()
    ours = llm_perplexity(llm, windows)
    figures = {
        "model": args.model,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "heldout_files": len(heldout),
        "tokens_scored": ours.num_tokens,
        "jserve_perplexity": ours.value,
        "jserve_seconds": round(time.perf_counter() - began, 1),
    }
    if args.reference:
        figures["transformers_perplexity"] = reference_perplexity(args.model, windows).value
    if not args.no_bigram:
        train = tokenize(llm.tokenizer, corpus_files(args.corpus, split="train"))
        figures["bigram_perplexity"] = BigramModel(train, llm.engine.vocab_size).perplexity(windows).value
        figures["ratio_to_bigram"] = figures["jserve_perplexity"] / figures["bigram_perplexity"]
    for key, value in figures.items():
        print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
