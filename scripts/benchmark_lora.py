#!/usr/bin/env python
"""Multi-LoRA throughput: concurrent requests spread over N adapters against the same requests on the base
model, in one process.

Two engines over the same checkpoint (default: the bundled model), built before any timing: one without LoRA,
one with ``enable_lora`` (``--max-loras`` device slots, every adapter held in host memory). The adapters are
real PEFT adapters of the checkpoint (``peft.get_peft_model`` with random weights, ``save_pretrained``), rank
``--rank``, on every projection (``--targets``). Each workload is ``--requests`` greedy requests of
``--max-tokens`` tokens added at once, request i with adapter i mod N; rows:

- ``no LoRA``: the engine without LoRA (the reference);
- ``LoRA engine, base requests``: what enabling LoRA costs requests that use none;
- ``N adapters``: for each N of ``--adapters`` (more than ``--max-loras`` swaps adapters through the slots).

Each row is the median of ``--repeats`` rounds (engines alternate within a round; prefix caches reset) after an
untimed warm-up. Besides output tok/s and the ratio to ``no LoRA`` it reports the time to first token (median
and longest: a request parked for an adapter slot shows there) and the longest wait between two tokens of a
request once it runs.

    python scripts/benchmark_lora.py [--model DIR] [--requests 64] [--adapters 1 8 32] [--max-loras 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from jserve import BUNDLED_MODEL, LLM, LoRARequest, SamplingParams
from jserve.lora.request import ALL_TARGETS


def make_adapters(model_dir: Path, count: int, rank: int, targets: list[str], out_dir: Path) -> list[LoRARequest]:
    """``count`` PEFT adapters of the checkpoint with random (non-zero) weights, as LoRARequests."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    requests = []
    for i in range(count):
        torch.manual_seed(i)
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        path = out_dir / f"adapter-{i}"
        model.save_pretrained(path)
        requests.append(LoRARequest(f"adapter-{i}", i + 1, str(path)))
    return requests


def run_workload(llm: LLM, prompts: list[list[int]], params: SamplingParams, adapters: list) -> dict:
    """All requests added at once, stepped to the end: tokens/s, time to first token (median, max) and the
    longest wait between two tokens of a running request."""
    engine = llm.engine
    engine.reset_prefix_cache()
    start = time.perf_counter()
    last: dict[str, float] = {}
    first: dict[str, float] = {}
    gap = 0.0
    tokens = 0
    for i, prompt in enumerate(prompts):
        adapter = adapters[i % len(adapters)] if adapters else None
        rid = engine.add_request(prompt, params, request_id=f"r{i}", lora_request=adapter)
        last[rid] = start
    done = 0
    while done < len(prompts):
        for out in engine.step():
            now = time.perf_counter()
            new = sum(len(c.token_ids) for c in out.outputs)
            if new:
                tokens += new
                if out.request_id in first:
                    gap = max(gap, now - last[out.request_id])
                else:
                    first[out.request_id] = now - start
                last[out.request_id] = now
            done += out.finished
    wall = time.perf_counter() - start
    ttft = sorted(first.values())
    return {
        "tok_s": tokens / wall,
        "wall_s": wall,
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_max_s": ttft[-1],
        "max_token_gap_s": gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated projections adapted")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    targets = args.targets.split(",")
    engine_args = dict(max_num_seqs=args.requests, max_model_len=args.prompt_len + args.max_tokens + 16, progress=False)
    plain = LLM(args.model, **engine_args)
    lora = LLM(
        args.model,
        enable_lora=True,
        max_loras=args.max_loras,
        max_lora_rank=args.rank,
        max_cpu_loras=max(args.adapters),
        lora_target_modules=",".join(targets),
        **engine_args,
    )
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(args.model), max(args.adapters), args.rank, targets, Path(tmp))
        for adapter in adapters:
            lora.engine.register_adapter(adapter)  # read once, before timing (the host tier holds them all)
        rng = np.random.default_rng(0)
        vocab = plain.engine.vocab_size
        prompts = [rng.integers(3, vocab, size=args.prompt_len).tolist() for _ in range(args.requests)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        rows = {"no LoRA": (plain, []), "LoRA engine, base requests": (lora, [])}
        rows |= {f"{n} adapters": (lora, adapters[:n]) for n in args.adapters}
        for llm, chosen in rows.values():  # warm-up: first steps, first adapter loads
            run_workload(llm, prompts[:8], params, chosen)
        runs: dict[str, list[dict]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, (llm, chosen) in rows.items():
                runs[name].append(run_workload(llm, prompts, params, chosen))
        report(args, runs, lora.stats())


def report(args, runs: dict[str, list[dict]], stats: dict) -> None:
    median = {name: sorted(r, key=lambda x: x["tok_s"])[len(r) // 2] for name, r in runs.items()}
    reference = median["no LoRA"]["tok_s"]
    print(
        f"{args.requests} requests x {args.max_tokens} tokens, prompt {args.prompt_len}, rank {args.rank}, "
        f"max_loras {args.max_loras}, targets {args.targets}; median of {args.repeats}"
    )
    print(f"{'workload':<30}{'tok/s':>10}{'vs no LoRA':>12}{'TTFT p50 s':>12}{'TTFT max s':>12}{'max gap s':>11}")
    for name, row in median.items():
        print(
            f"{name:<30}{row['tok_s']:>10.1f}{row['tok_s'] / reference:>11.2f}x{row['ttft_p50_s']:>12.2f}"
            f"{row['ttft_max_s']:>12.2f}{row['max_token_gap_s']:>11.2f}"
        )
    spread = {name: statistics.pstdev([r["tok_s"] for r in rs]) for name, rs in runs.items()}
    print("lora counters:", {k: v for k, v in stats.items() if k.startswith("lora_")})
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": date.today().isoformat(),
                    "machine": platform.processor() or platform.machine(),
                    "args": vars(args) | {"json": None},
                    "median": median,
                    "tok_s_stdev": spread,
                    "lora_counters": {k: v for k, v in stats.items() if k.startswith("lora_")},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
