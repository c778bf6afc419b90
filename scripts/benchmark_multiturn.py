#!/usr/bin/env python
"""Multi-turn chat with a device KV pool too small for the conversations: the host tier against recomputing,
and against a pool that holds everything, in one process.

``--conversations`` conversations share a ``--system-len``-token system prompt; each turn sends the whole
history (system prompt, every earlier user message and reply) plus a new ``--user-len``-token user message and
gets a ``--reply-len``-token greedy reply. Turns go round robin over the conversations, ``--concurrency`` at a
time (their requests added together and stepped to the end). Three engines over the same checkpoint, built
before any timing:

- ``no host tier``: a device pool of ``--pool-fraction`` of the working set (every conversation's final
  history, the shared system prompt once), but at least what the concurrent requests need;
- ``host tier``: the same pool plus ``kv_offloading_size`` (``--host-gib``);
- ``pool holds all``: a pool of the whole working set (the ideal).

``--no-reuse`` sends, in place of each history, fresh random tokens of its length: nothing is ever found again,
so the host tier only costs (its copies out), and the throughput ratio of the first two engines is that cost.

Each row is the median of ``--repeats`` rounds (engines alternate within a round; both cache tiers reset before
each run) after an untimed warm-up. Reported: prefill tokens computed, time to first token of the later turns
(p50, p99), output tokens per second over the whole run, and the host tier's copies.

    python scripts/benchmark_multiturn.py [--model DIR] [--conversations 12] [--turns 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from jserve import BUNDLED_MODEL, LLM, SamplingParams


def plan_conversations(args, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
    """The shared system prompt and, per conversation, its user messages (seeded: every engine sees the same)."""
    rng = np.random.default_rng(0)
    system = rng.integers(3, vocab, size=args.system_len).tolist()
    users = [
        [rng.integers(3, vocab, size=args.user_len).tolist() for _ in range(args.turns)]
        for _ in range(args.conversations)
    ]
    return system, users


def working_set_tokens(args) -> tuple[int, int]:
    """(tokens of every conversation's final history with the system prompt counted once, the longest request)."""
    longest = args.system_len + args.turns * args.user_len + args.turns * args.reply_len
    return args.system_len + args.conversations * (longest - args.system_len), longest


def run_conversations(llm: LLM, args, system: list[int], users: list[list[list[int]]]) -> dict:
    """Every turn of every conversation, round robin, ``--concurrency`` at a time; per-run figures."""
    engine = llm.engine
    assert engine.reset_prefix_cache()
    before = engine.stats()
    params = SamplingParams(temperature=0.0, max_tokens=args.reply_len, ignore_eos=True)
    histories = [list(system) for _ in users]
    fresh = np.random.default_rng(1)
    ttft_later: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for turn in range(args.turns):
        for wave in range(0, len(users), args.concurrency):
            members = range(wave, min(wave + args.concurrency, len(users)))
            added = {}
            for i in members:
                histories[i] += users[i][turn]
                prompt = histories[i]
                if args.no_reuse:
                    prompt = fresh.integers(3, engine.vocab_size, size=len(prompt)).tolist()
                added[engine.add_request(prompt, params, request_id=f"c{i}t{turn}")] = (i, time.perf_counter())
            replies, first = _step_to_end(engine, added)
            for rid, (i, _) in added.items():
                histories[i] += replies[rid]
                tokens += len(replies[rid])
            if turn > 0:
                ttft_later += [first[rid] - added_at for rid, (_, added_at) in added.items()]
    wall = time.perf_counter() - start
    after = engine.stats()
    ttft = np.array(ttft_later)
    return {
        "prefill_tokens": after["prompt_tokens_computed"] - before["prompt_tokens_computed"],
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "tok_s": tokens / wall,
        "wall_s": wall,
        "host_hit_tokens": after.get("host_hit_tokens", 0) - before.get("host_hit_tokens", 0),
        "pages_to_host": after.get("host_pages_offloaded", 0) - before.get("host_pages_offloaded", 0),
        "pages_to_device": after.get("host_pages_restored", 0) - before.get("host_pages_restored", 0),
        "copy_s": after.get("host_copy_seconds", 0.0) - before.get("host_copy_seconds", 0.0),
        "preemptions": after["num_preemptions"] - before["num_preemptions"],
    }


def _step_to_end(engine, added: dict) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Steps until the added requests finish: their replies and first-token times."""
    replies = {rid: [] for rid in added}
    first: dict[str, float] = {}
    done = 0
    while done < len(added):
        for out in engine.step():
            new = out.outputs[0].token_ids
            if new and out.request_id not in first:
                first[out.request_id] = time.perf_counter()
            replies[out.request_id] += new
            done += out.finished
    return replies, first


def build_engines(args) -> dict[str, LLM]:
    working_set, longest = working_set_tokens(args)
    pages = -(-working_set // args.page_size)
    running = args.concurrency * -(-(longest + args.page_size) // args.page_size)
    tight = max(int(pages * args.pool_fraction), running) + 1
    common = dict(
        dtype=args.dtype,
        page_size=args.page_size,
        max_model_len=longest + args.page_size,
        max_num_seqs=args.concurrency,
        progress=False,
    )
    print(f"working set {working_set} tokens = {pages} pages; tight pool {tight - 1} pages, roomy {pages + running}")
    return {
        "no host tier": LLM(args.model, num_pages=tight, **common),
        "host tier": LLM(args.model, num_pages=tight, kv_offloading_size=args.host_gib, **common),
        "pool holds all": LLM(args.model, num_pages=pages + running + 1, **common),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=512)
    parser.add_argument("--user-len", type=int, default=64)
    parser.add_argument("--reply-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--pool-fraction", type=float, default=0.25)
    parser.add_argument("--host-gib", type=float, default=1.0)
    parser.add_argument("--no-reuse", action="store_true", help="fresh prompts: the host tier's cost alone")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    engines = build_engines(args)
    system, users = plan_conversations(args, next(iter(engines.values())).engine.vocab_size)
    for llm in engines.values():  # warm-up: first steps and copies
        warm = argparse.Namespace(**{**vars(args), "turns": 2, "conversations": 2 * args.concurrency})
        run_conversations(llm, warm, system, [u[:2] for u in users[: warm.conversations]])
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            runs[name].append(run_conversations(llm, args, system, users))
    report(args, runs)


def report(args, runs: dict[str, list[dict]]) -> None:
    median = {name: sorted(r, key=lambda x: x["wall_s"])[len(r) // 2] for name, r in runs.items()}
    base, ideal = median["no host tier"], median["pool holds all"]
    mode = "no reuse: " if args.no_reuse else ""
    print(
        f"{mode}{args.conversations} conversations x {args.turns} turns, system {args.system_len}, "
        f"user {args.user_len}, reply {args.reply_len}, concurrency {args.concurrency}; median of {args.repeats}"
    )
    print(
        f"{'engine':<16}{'prefill tok':>12}{'vs ideal':>9}{'TTFT p50 s':>11}{'TTFT p99 s':>11}{'p50 gain':>9}"
        f"{'tok/s':>8}{'gain':>7}{'to host':>8}{'to dev':>8}{'copy s':>8}"
    )
    for name, row in median.items():
        print(
            f"{name:<16}{row['prefill_tokens']:>12}{row['prefill_tokens'] / ideal['prefill_tokens']:>8.2f}x"
            f"{row['ttft_p50_s']:>11.3f}{row['ttft_p99_s']:>11.3f}{base['ttft_p50_s'] / row['ttft_p50_s']:>8.2f}x"
            f"{row['tok_s']:>8.1f}{row['tok_s'] / base['tok_s']:>6.2f}x{row['pages_to_host']:>8}"
            f"{row['pages_to_device']:>8}{row['copy_s']:>8.3f}"
        )
    if args.json:
        summary = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine()}
        args.json.write_text(json.dumps({**summary, "args": vars(args) | {"json": None}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
