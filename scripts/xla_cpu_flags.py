#!/usr/bin/env python
"""Which XLA:CPU compiler options make jserve's steps fastest: each candidate in its own process, rounds interleaved.

XLA reads ``XLA_FLAGS`` once, when its CPU client starts, so every candidate runs in a fresh worker process
(``--worker``): it builds ``LLM`` (float32, ``max_model_len`` 512, ``max_num_seqs`` = the largest workload) with
the candidate's flags added to the user's ``XLA_FLAGS``, warms up, and times each
workload's greedy generation (EOS ignored). Rounds alternate the candidates; the table reports the median
tokens/s of the rounds and the ratio to the first candidate ("xla": XLA's defaults), and checks that every
candidate's greedy tokens equal the first's.

    python scripts/xla_cpu_flags.py [--model bundled|llama-159m|DIR] [--workloads 1x64,64x32] [--rounds 3]
                                    [--candidates xla,onednn,...]

Measured on 2026-12-06 (docs/benchmarks.md, "XLA:CPU options"): no set beat XLA's defaults by more than the
run-to-run spread, so jserve sets no XLA:CPU option; rerun this where the CPU or jaxlib differs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_vs_vllm import build_jserve, make_prompts, model_dir, parse_workloads, run_jserve  # noqa: E402

CANDIDATES = {
    "xla": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn-dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn-dot": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot",
    "no-ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "fast-math": "--xla_cpu_enable_fast_math=true",
}


def worker(model: str, workloads: list[tuple[int, int]]) -> dict:
    """Runs in the candidate's process: tok/s per workload and each workload's greedy tokens."""
    llm = build_jserve(model, max(n for n, _ in workloads))
    out = {}
    for num, length in workloads:
        prompts = make_prompts(num, llm.engine.vocab_size)
        run_jserve(llm, prompts[:1], 4)
        run = run_jserve(llm, prompts, length)
        out[f"{num}x{length}"] = {"tok_s": num * length / run["seconds"], "tokens": run["tokens"]}
    return out


def run_candidate(name: str, args) -> dict:
    user = os.environ.get("XLA_FLAGS", "")
    env = {**os.environ, "XLA_FLAGS": f"{user} {CANDIDATES[name]}".strip()}
    cmd = [sys.executable, __file__, "--worker", "--model", args.model_path, "--workloads", args.workloads]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, list[dict]], workloads: list[str]) -> str:
    base = results[next(iter(results))]
    lines = ["| candidate | XLA_FLAGS | " + " | ".join(f"{w} tok/s (vs xla)" for w in workloads) + " | tokens |"]
    lines.append("|---" * (len(workloads) + 3) + "|")
    for name, rounds in results.items():
        ok = [r for r in rounds if "error" not in r]
        if not ok:
            lines.append(
                f"| {name} | `{CANDIDATES[name]}` | "
                + " | ".join("-" for _ in workloads)
                + f" | {rounds[0]['error'][:80]} |"
            )
            continue
        cells, same = [], True
        for w in workloads:
            tok_s = statistics.median(r[w]["tok_s"] for r in ok)
            ref = statistics.median(r[w]["tok_s"] for r in base if "error" not in r)
            cells.append(f"{tok_s:.1f} ({tok_s / ref:.2f}x)")
            same &= ok[-1][w]["tokens"] == base[-1][w]["tokens"]
        lines.append(
            f"| {name} | `{CANDIDATES[name] or '(none)'}` | "
            + " | ".join(cells)
            + f" | {'same' if same else 'DIFFER'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--workloads", default="1x64,64x32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workloads = parse_workloads(args.workloads)
    if args.worker:
        print(json.dumps(worker(args.model, workloads)))
        return
    args.model_path = model_dir(args.model)
    names = args.candidates.split(",")
    results: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            start = time.perf_counter()
            results[name].append(run_candidate(name, args))
            print(f"round {r + 1} {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(report(results, [f"{n}x{m}" for n, m in workloads]))


if __name__ == "__main__":
    main()
