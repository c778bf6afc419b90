"""Accuracy of weight and KV-cache quantization on the bundled trained model: held-out perplexity per scheme.

    python scripts/eval_quantization.py [MODEL] [--max-files 30] [--json out.json]

Every scheme scores the same held-out windows as ``scripts/eval_perplexity.py`` (float32 compute on CPU; the
dense baseline is the checkpoint's bf16 weights). Device bytes come from ``LLM.stats()`` of the same scheme built
with dtype="bfloat16" (what an accelerator would hold; nothing is run there). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from jserve.perplexity import file_windows, llm_perplexity  # noqa: E402
from jserve.stdlib_corpus import corpus_files  # noqa: E402
from scripts.eval_perplexity import tokenize  # noqa: E402

SCHEMES = [  # (label, LLM keywords)
    ("unquantized", {}),
    ("int8 weights (per channel)", dict(quantization="int8")),
    ("int4 weights, group 128", dict(quantization="int4", quantization_group_size=128)),
    ("int4 weights, group 32", dict(quantization="int4", quantization_group_size=32)),
    ("fp8 weights (e4m3, per channel)", dict(quantization="fp8")),
    ("int8 KV cache", dict(kv_cache_dtype="int8")),
    ("fp8 KV cache", dict(kv_cache_dtype="fp8")),
    ("int4 g128 weights + int8 KV", dict(quantization="int4", quantization_group_size=128, kv_cache_dtype="int8")),
]


def main() -> None:
    from jserve import BUNDLED_MODEL, LLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(BUNDLED_MODEL))
    parser.add_argument("--max-files", type=int, default=30, help="the first N held-out files")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    engine = dict(max_model_len=args.window + 1, max_num_seqs=64, progress=False)
    rows = []
    windows = None
    for label, kwargs in SCHEMES:
        began = time.perf_counter()
        llm = LLM(args.model, dtype="float32", **engine, **kwargs)
        if windows is None:
            heldout = corpus_files(None, split="heldout")[: args.max_files]
            windows = [w for ids in tokenize(llm.tokenizer, heldout) for w in file_windows(ids, args.window)]
        ppl = llm_perplexity(llm, windows, progress=False)
        del llm
        sized = LLM(args.model, dtype="bfloat16", precompile=False, num_pages=4, max_model_len=32, **kwargs).stats()
        rows.append(
            dict(
                scheme=label,
                **kwargs,
                perplexity=ppl.value,
                tokens=ppl.num_tokens,
                weight_bytes=sized["weight_bytes"],
                kv_bytes_per_token=sized["kv_bytes_per_token"],
                seconds=round(time.perf_counter() - began, 1),
            )
        )
        print(f"{label}: {ppl.value:.4f} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    base = rows[0]
    print(f"\n{len(windows)} windows, {base['tokens']} tokens scored\n")
    print("| scheme | held-out perplexity | delta | weight bytes (bf16 model) | KV bytes / token |")
    print("|---|---|---|---|---|")
    for r in rows:
        delta = (r["perplexity"] / base["perplexity"] - 1) * 100
        print(
            f"| {r['scheme']} | {r['perplexity']:.3f} | {delta:+.2f}% | {r['weight_bytes'] / 1e6:.2f} MB "
            f"({r['weight_bytes'] / base['weight_bytes']:.2f}x) | {r['kv_bytes_per_token']} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
