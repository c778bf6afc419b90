#!/usr/bin/env python
"""Where one engine step's time goes: per part of the step, from jax's profiler and the program's XLA metadata.

Runs a real engine (``jserve.LLM``) to the wanted state, then traces ``--steps`` engine steps with
``jax.profiler``. Every XLA op the step program ran is timed from the trace and attributed to a part of the step
through the op's metadata (the ``jax.named_scope`` labels the model and runner put on ``embed``, ``qkv_proj``,
``kv_write``, ``attention``, ``o_proj``, ``mlp``, ``lm_head``, ``sampler``, ``prompt_logprobs``); what carries
no label is "other" (norms, residual adds, glue). "host on the critical path" is the step's wall time (timed
without the profiler) minus the device's busy time in it.

    python scripts/profile_step.py [--model bundled|llama-159m|DIR] [--batch 1] [--phase decode|prefill]
                                   [--prompt-len 64] [--max-num-seqs 64] [--steps 16] [--json out.json]
                                   [--sampling greedy|top-p]
                                   [--lora-adapters N --lora-rank R]  (multi-LoRA: the batch over N adapters)

``llama-159m`` is a random Llama of the shape our speed issue measures (hidden 1024, 8 layers, 16/8 heads,
vocab 32000), written once to a temporary directory with transformers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PARTS = (
    "lora",
    "sampler",
    "prompt_logprobs",
    "lm_head",
    "embed",
    "kv_write",
    "attention",
    "qkv_proj",
    "o_proj",
    "mlp",
)
"""Scope labels, most specific first (an op under ``lm_head`` inside ``prompt_logprobs`` counts as the latter)."""

SAMPLING = {"greedy": {"temperature": 0.0}, "top-p": {"temperature": 0.8, "top_p": 0.95}}
"""``--sampling`` choices (also benchmark_vs_vllm.py's): greedy, or what chat clients commonly send."""

_OP_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\S+\s+[\w\-]+\(([^)]*)\)")


def make_llama_159m(out_dir: Path) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_llm(args):
    from jserve import BUNDLED_MODEL, LLM

    kw = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, precompile=False)
    model = str(BUNDLED_MODEL) if args.model == "bundled" else args.model
    if model == "llama-159m":
        model = str(make_llama_159m(Path(tempfile.mkdtemp(prefix="jserve-159m-"))))
    if not args.lora_adapters:
        return LLM(model=model, **kw)
    from benchmark_lora import make_adapters  # scripts/, next to this one

    from jserve.lora.request import ALL_TARGETS

    llm = LLM(model=model, enable_lora=True, max_loras=args.lora_adapters, max_lora_rank=args.lora_rank, **kw)
    adapters = make_adapters(Path(model), args.lora_adapters, args.lora_rank, ALL_TARGETS, Path(tempfile.mkdtemp()))
    llm.adapters = [None] if args.lora_base_requests else adapters
    return llm


def add_requests(llm, args, max_tokens: int) -> list[str]:
    from jserve import SamplingParams

    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **SAMPLING[args.sampling])
    vocab = llm.engine.vocab_size
    adapters = getattr(llm, "adapters", [None])
    return [
        llm.engine.add_request(
            rng.integers(3, vocab, size=args.prompt_len).tolist(), params, lora_request=adapters[i % len(adapters)]
        )
        for i in range(args.batch)
    ]


def to_decode_state(llm, args) -> None:
    """Every request past its prefill, decoding; a few decode steps run first (compiling the bucket)."""
    engine = llm.engine
    add_requests(llm, args, max_tokens=10_000)
    engine._drain_inbox()  # the requests wait in the inbox until a step takes them
    while any(r.num_output_tokens < 4 for r in engine._sequences.values()):
        engine.step()


def run_steps(llm, args, count: int) -> list[float]:
    """Wall seconds of ``count`` steps in the wanted phase (prefill: a fresh batch each time, cache reset)."""
    engine = llm.engine
    times = []
    for _ in range(count):
        if args.phase == "prefill":
            ids = add_requests(llm, args, max_tokens=1)
            engine._drain_inbox()
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
            for rid in ids:
                engine.abort_request(rid)
            while engine.has_unfinished():
                engine.step()
            engine.reset_prefix_cache()
        else:
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    return times


def op_parts(llm, bucket: int) -> dict[str, str]:
    """hlo op name -> part, over the step programs of the traced token bucket (op names repeat across programs,
    so only the programs that ran may label them). Ops that XLA made without metadata (a [1, K] x [K, N] dot
    rewritten for the one-token bucket, say) take the part of the op that consumes them."""
    parts: dict[str, str] = {}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for stage in llm.engine.runner.stages:
        for line in stage.programs[bucket].as_text().splitlines():
            m = _OP_NAME.match(line)
            if m:
                parts.setdefault(m.group(1), _part_of(m.group(2)))
            inst = _INSTRUCTION.match(line)
            if inst:
                for operand in re.findall(r"%([\w.\-]+)", inst.group(2)):
                    users[operand].append(inst.group(1))
    for _ in range(8):  # a few hops: bitcasts and copies between an unlabeled op and a labeled user
        for op, consumers in users.items():
            if op not in parts:
                labels = [parts[c] for c in consumers if c in parts and parts[c] != "other"]
                if labels:
                    parts[op] = labels[0]
    return parts


def traced_bucket(llm, args) -> int:
    """The token bucket of the traced steps."""
    from jserve.engine.shapes import round_up

    shapes = llm.engine.runner.shapes
    tokens = args.batch if args.phase == "decode" else args.batch * args.prompt_len
    return round_up(min(tokens, shapes.token_buckets[-1]), shapes.token_buckets)


def _part_of(op_name: str) -> str:
    scopes = op_name.split("/")
    for part in PARTS:
        if part in scopes:
            return part
    return "other"


def trace_steps(llm, args, trace_dir: Path) -> tuple[dict[str, float], float, int]:
    """Per-part device milliseconds summed over the traced steps, the device's busy time, and the steps' count
    of program executions."""
    import jax

    jax.profiler.start_trace(str(trace_dir))
    run_steps(llm, args, args.steps)
    jax.profiler.stop_trace()
    (path,) = glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True)
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    parts = op_parts(llm, traced_bucket(llm, args))
    ops = [e for e in events if "hlo_op" in (e.get("args") or {}) and "stage_step" in e["args"].get("hlo_module", "")]
    per_op = _exclusive_times(ops)
    per_part: dict[str, float] = collections.defaultdict(float)
    for op, us in per_op.items():
        per_part[parts.get(op, "other")] += us / 1000
    if args.top:
        print(f"top {args.top} ops (exclusive ms/step):")
        for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {us / 1000 / args.steps:8.3f}  {op:<28} {parts.get(op, 'other')}")
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for e in ops:
        spans[e["args"].get("run_id", "")].append((e["ts"], e["ts"] + e["dur"]))
    busy = sum(_union_length(s) for s in spans.values()) / 1000
    return dict(per_part), busy, len(spans)


def _exclusive_times(ops: list[dict]) -> dict[str, float]:
    """Microseconds per op name, each event less the events nested in it on its thread (a ``cond`` or
    ``while`` thunk contains the thunks of its body)."""
    per_op: dict[str, float] = collections.defaultdict(float)
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in ops:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for events in by_thread.values():
        stack: list[list] = []  # [end, name, child time]
        for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1][0] <= e["ts"]:
                _, name, children, dur = stack.pop()
                per_op[name] += dur - children
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e["ts"] + e["dur"], e["args"]["hlo_op"], 0.0, e["dur"]])
        for _, name, children, dur in stack:
            per_op[name] += dur - children
    return per_op


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def weight_read_ms(llm, repeats: int = 20) -> float:
    """Median milliseconds of one jitted pass that reads every parameter once (a float32 sum of each): the floor
    of a decode step that is bound by reading its weights."""
    import jax
    import jax.numpy as jnp

    leaves = list(llm.engine.runner.params().values())
    read_all = jax.jit(lambda xs: sum(jnp.sum(x, dtype=jnp.float32) for x in xs))
    read_all(leaves).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read_all(leaves).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def report(args, wall_ms: float, per_part: dict[str, float], busy_ms: float, weights_ms: float) -> dict:
    op_total = sum(per_part.values())
    rows = {part: ms / args.steps for part, ms in sorted(per_part.items(), key=lambda kv: -kv[1])}
    busy = busy_ms / args.steps
    host = max(wall_ms - busy, 0.0)
    print(f"{args.model}, {args.phase}, batch {args.batch}, prompt {args.prompt_len}, max_num_seqs {args.max_num_seqs}")
    print(f"step wall time (median, no profiler): {wall_ms:.2f} ms; device busy: {busy:.2f} ms")
    ratio = wall_ms / weights_ms
    print(f"weight read (one pass over the parameters): {weights_ms:.2f} ms; step / weight read: {ratio:.2f}")
    print(f"{'part':<28}{'ms/step':>10}{'share':>8}")
    for part, ms in rows.items():
        print(f"{part:<28}{ms:>10.3f}{ms * args.steps / op_total:>8.1%}")
    print(f"{'host on the critical path':<28}{host:>10.3f}{'':>8}")
    print("(op times are summed over the threads that ran them; shares are of that sum)")
    return {
        "wall_ms": wall_ms,
        "device_busy_ms": busy,
        "host_critical_ms": host,
        "weight_read_ms": weights_ms,
        "parts_ms": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--sampling", default="greedy", choices=tuple(SAMPLING))
    parser.add_argument("--lora-adapters", type=int, default=0, help="spread the batch over N adapters (slots)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-base-requests", action="store_true", help="with --lora-adapters: no request uses one")
    parser.add_argument("--top", type=int, default=0, help="also list the N most expensive ops")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    llm = build_llm(args)
    if args.phase == "decode":
        to_decode_state(llm, args)
    run_steps(llm, args, 3)  # compiles what the phase uses
    wall = statistics.median(run_steps(llm, args, args.steps)) * 1000
    with tempfile.TemporaryDirectory() as tmp:
        per_part, busy, _ = trace_steps(llm, args, Path(tmp))
    figures = report(args, wall, per_part, busy, weight_read_ms(llm))
    if args.json:
        args.json.write_text(json.dumps(vars(args) | {"json": None} | figures, indent=1, default=str))


if __name__ == "__main__":
    main()
