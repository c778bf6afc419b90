#!/usr/bin/env python
"""What structured outputs cost: output tok/s of JSON-schema-constrained requests against the same requests
unconstrained, on the bundled model, in one run, with the grammar compile time on its own line.

For each batch size (default 1, 16, 64) the same prompts run three ways on one engine (compiled once, before
any timing): unconstrained; constrained to a bounded JSON schema; and half and half (the mixed batch a server
sees). Constrained rows add the host's per-step mask computation and, under async scheduling, sit out a step
while their last token is on the device. Every request generates exactly --max-tokens tokens (``ignore_eos``, and
the schema is long enough to need them) so the three runs do the same amount of decoding. Each row is the median
of --repeats runs; --json writes the rows.

    python scripts/benchmark_structured.py [--max-tokens 48] [--batch-sizes 1 16 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from datetime import date

from jserve import BUNDLED_MODEL, LLM, SamplingParams, StructuredOutputsParams
from jserve.stdlib_corpus import function_sources

# a record of many bounded fields: long enough that a request never finishes before --max-tokens
SCHEMA = {
    "type": "object",
    "properties": {
        f"field_{i}": {"type": "string", "maxLength": 12} if i % 2 else {"type": "integer", "minimum": 0}
        for i in range(24)
    },
    "required": [f"field_{i}" for i in range(24)],
    "additionalProperties": False,
}


def run(llm: LLM, prompts: list[str], constrained: list[bool], max_tokens: int) -> tuple[float, int]:
    spec = StructuredOutputsParams(json=SCHEMA)
    params = [
        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=spec if c else None)
        for c in constrained
    ]
    llm.engine.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    llm = LLM(BUNDLED_MODEL, dtype=args.dtype, max_num_seqs=max(args.batch_sizes), max_model_len=512, progress=False)
    start = time.perf_counter()
    llm.engine.compile_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(json=SCHEMA)))
    compile_ms = (time.perf_counter() - start) * 1e3
    print(f"grammar compile (first request with this schema, cached after): {compile_ms:.1f} ms")
    num_prompts = max(4, *args.batch_sizes)  # the warm-up below takes four
    sources = [s for _, s in itertools.islice(function_sources("heldout", min_lines=4), num_prompts)]
    prompts_all = ["\n".join(s.splitlines()[:3]) + "\nrecord = " for s in sources]
    run(llm, prompts_all[:4], [True, False, True, False], 8)  # warm-up: every path once

    rows = []
    print(f"{'batch':>5} {'plain tok/s':>12} {'constrained':>12} {'ratio':>6} {'mixed':>10} {'ratio':>6}")
    for batch in args.batch_sizes:
        prompts = prompts_all[:batch]
        kinds = {"plain": [False] * batch, "constrained": [True] * batch, "mixed": [i % 2 == 0 for i in range(batch)]}
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for kind, constrained in kinds.items():
                seconds, tokens = run(llm, prompts, constrained, args.max_tokens)
                rates[kind].append(tokens / seconds)
        med = {k: statistics.median(v) for k, v in rates.items()}
        row = {"batch": batch, **{f"{k}_tok_s": round(v, 1) for k, v in med.items()}}
        row["constrained_ratio"] = round(med["constrained"] / med["plain"], 3)
        row["mixed_ratio"] = round(med["mixed"] / med["plain"], 3)
        rows.append(row)
        print(
            f"{batch:>5} {med['plain']:>12.1f} {med['constrained']:>12.1f} {row['constrained_ratio']:>6.2f}"
            f" {med['mixed']:>10.1f} {row['mixed_ratio']:>6.2f}"
        )
    stats = llm.stats()
    assert stats["programs_lowered_while_serving"] == 0, stats
    if args.json:
        meta = {"date": str(date.today()), "machine": platform.processor() or platform.machine(), "args": vars(args)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "compile_ms": compile_ms, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
