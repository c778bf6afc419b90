#!/usr/bin/env python
"""Speculative decoding on the bundled trained model: output tok/s with and without each method, in one run.

Three prompt sets from held-out standard-library functions (files the model never saw):

- input-grounded: a function, then a request to write it again under a new name, so the answer mostly copies
  the prompt (what prompt lookup is for);
- free completion: a function's first three lines, which the model continues;
- mix: the two alternating.

For each set and batch size (default 1 and 16) every engine (plain, then each method with adaptive speculation,
and with --compare-fixed each method drafting whenever it can) generates --max-tokens greedy tokens for the
same prompts; batch 1 runs --batch1-prompts prompts one after another. Each engine is built once, before any
timing (every program compiled), and runs one untimed warm-up batch; each row is --repeats rounds over all
engines (prefix cache reset before each run, each round starting at another engine), and the median run is
reported. Prints output tok/s, the speedup over plain decoding (the median over rounds of the ratio to plain
decoding in the same round, and the rounds' range), and the acceptance counters; --json writes them.

    python scripts/benchmark_speculative.py [--max-tokens 96] [--batch-sizes 1 16] [--compare-fixed] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from datetime import date

from jserve import BUNDLED_DRAFT_MODEL, BUNDLED_MODEL, LLM, SamplingParams
from jserve.stdlib_corpus import function_sources, repeat_prompt


def prompt_sets(n: int) -> dict[str, list[str]]:
    functions = list(itertools.islice(function_sources("heldout", min_lines=8, max_lines=24), n))
    grounded = [repeat_prompt(name, source) for name, source in functions]
    free = ["\n".join(source.splitlines()[:3]) + "\n" for _, source in functions]
    return {
        "input-grounded": grounded,
        "free completion": free,
        "mix": [grounded[i] if i % 2 == 0 else free[i] for i in range(n)],
    }


def build(args, method: str | None, k: int, adaptive: bool = True) -> LLM:
    spec = {}
    if method is not None:
        model = str(BUNDLED_DRAFT_MODEL) if method == "draft" else method
        spec = dict(
            speculative_model=model,
            num_speculative_tokens=k,
            speculative_max_batch_size=args.max_batch_size,
            speculative_adaptive=adaptive,
        )
    return LLM(
        BUNDLED_MODEL,
        dtype=args.dtype,
        max_num_seqs=max(args.batch_sizes),
        max_model_len=args.max_model_len,
        progress=False,
        **spec,
    )


def timed(llm: LLM, prompts: list[str], batch: int, max_tokens: int) -> tuple[float, int, dict]:
    """Seconds and output tokens for the prompts in batches of ``batch``, plus the spec counters' change."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.engine.reset_prefix_cache()  # every run prefills its prompts itself
    before = llm.stats()
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        for out in llm.generate(prompts[i : i + batch], params, use_tqdm=False):
            tokens += len(out.outputs[0].token_ids)
    seconds = time.perf_counter() - start
    after = llm.stats()
    delta = {
        key: after[key] - before[key]
        for key in ("spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_drafting_rows")
        if key in after
    }
    return seconds, tokens, delta


def report_row(set_name: str, batch: int, name: str, runs: list, plain_runs: list) -> dict:
    """One engine's row: its median run, and its speedup as the median over rounds of its rate over plain
    decoding's rate in the same round (paired, so the machine's drift between rounds cancels), with the
    rounds' lowest and highest ratio."""
    seconds, tokens, spec = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
    if any(t == 0 for _, t, _ in [*runs, *plain_runs]):
        raise RuntimeError(f"{name} or plain decoding produced no tokens in a round: nothing to compare")
    ratios = sorted((t / s) / (pt / ps) for (s, t, _), (ps, pt, _) in zip(runs, plain_runs, strict=True))
    drafts = spec.get("spec_num_draft_tokens", 0)
    accepted = spec.get("spec_num_accepted_tokens", 0)
    drafting = spec.get("spec_num_drafting_rows", 0)
    row = dict(
        prompts=set_name,
        batch=batch,
        method=name,
        tokens=tokens,
        seconds=round(seconds, 3),
        tok_s=round(tokens / seconds, 1),
        speedup=round(statistics.median(ratios), 2),
        speedup_range=[round(ratios[0], 2), round(ratios[-1], 2)],
        acceptance_rate=round(accepted / drafts, 3) if drafts else None,
        mean_accepted_length=round((accepted + drafting) / drafting, 2) if drafting else None,
    )
    print(
        f"{set_name:16s} batch {batch:3d} {name:16s} {row['tok_s']:8.1f} tok/s  x{row['speedup']:.2f}"
        f" ({ratios[0]:.2f}-{ratios[-1]:.2f})  acceptance {row['acceptance_rate']}"
        f"  tokens/verification {row['mean_accepted_length']}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ngram", "early_exit", "draft"])
    # n-gram drafts cost nothing to make, and at batch 1 a 1 + 7 token verification fills the same 8-token
    # bucket as a plain step; the device drafters pay for each draft step
    parser.add_argument("--k", type=int, nargs="+", default=[7, 3, 3], help="num_speculative_tokens per method")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per row; the median run is reported")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--compare-fixed", action="store_true", help="also run each method with --no-speculative-adaptive"
    )
    parser.add_argument("--batch1-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-batch-size", type=int, default=4, help="speculative_max_batch_size (the policy)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sets = prompt_sets(max(max(args.batch_sizes), args.batch1_prompts))
    engines = {"plain": build(args, None, 0)}
    for method, k in zip(args.methods, args.k, strict=True):
        engines[method] = build(args, method, k)
        if args.compare_fixed:
            engines[f"{method}-fixed"] = build(args, method, k, adaptive=False)
    for llm in engines.values():  # one untimed batch each: first-use costs outside the timings
        llm.generate(sets["free completion"][:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)

    rows = []
    for set_name, prompts in sets.items():
        for batch in args.batch_sizes:
            chosen = prompts[: args.batch1_prompts] if batch == 1 else prompts[:batch]
            runs: dict[str, list] = {name: [] for name in engines}
            names = list(engines)
            for r in range(args.repeats):  # rounds over every engine, so drifts of the shared machine hit all;
                for name in names[r % len(names) :] + names[: r % len(names)]:  # each round starts elsewhere
                    runs[name].append(timed(engines[name], chosen, batch, args.max_tokens))
            for name in engines:
                rows.append(report_row(set_name, batch, name, runs[name], runs["plain"]))
    report = dict(
        date=date.today().isoformat(),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        settings=vars(args),
        rows=rows,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
