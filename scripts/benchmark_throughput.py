#!/usr/bin/env python
"""Offline throughput: jserve's LLM.generate() against transformers' batched generate() on the same model.

Both run in this process on the same random small Llama (default: hidden 256, 4 layers, 8 heads / 4 kv heads,
vocab 2048), the same prompts (random lengths in [min, max]) and the same number of output tokens (greedy,
EOS ignored). Each side runs once untimed first (compilation, allocator warm-up), then timed. transformers gets
left-padded static batches of --hf-batch-size. Prints output tokens/s for both and their ratio.

    python scripts/benchmark_throughput.py [--num-requests 64] [--output-len 64] [--hf-batch-size 16]

Diagnostics (jserve side): ``--breakdown`` prints where the timed run's steps went (decode-only vs prefill/mixed
steps: count, host dispatch, device wait); ``--ablate-attention`` makes every attention call return its query
unchanged, so the run shows what the rest of the step costs (a bound: the tokens it produces are meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_model(out_dir: Path, args) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 4,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_prompts(args) -> list[list[int]]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt_len, args.max_prompt_len + 1, size=args.num_requests)
    return [rng.integers(3, args.vocab_size, size=int(n)).tolist() for n in lengths]


def run_jserve(model_dir: Path, prompts: list[list[int]], args) -> float:
    from jserve import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_num_seqs=args.max_num_seqs,
        page_size=args.page_size,
        max_model_len=args.max_prompt_len + args.output_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)  # warm-up: compiles the buckets
    llm.engine.reset_prefix_cache()  # the timed run must not reuse the warm-up's prompt pages
    timings: list[tuple[bool, float, float]] = []
    if args.breakdown:
        if args.data_parallel_size > 1:
            raise SystemExit("--breakdown times one replica's runner: use it with --data-parallel-size 1")
        _time_steps(llm.engine.runner, timings)
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    if args.breakdown:
        _print_breakdown(timings, elapsed)
    return len(prompts) * args.output_len / elapsed


def _time_steps(runner, timings: list[tuple[bool, float, float]]) -> None:
    """Records (decode-only?, dispatch seconds, device wait seconds) for every step the runner runs."""
    dispatch, collect = runner.dispatch, runner.collect

    def timed_dispatch(plans):
        start = time.perf_counter()
        pending = dispatch(plans)
        pending.timing = (all(p.num_tokens == len(p.sampled_ids) for p in plans), time.perf_counter() - start)
        return pending

    def timed_collect(pending):
        start = time.perf_counter()
        results = collect(pending)
        timings.append((*pending.timing, time.perf_counter() - start))
        return results

    runner.dispatch, runner.collect = timed_dispatch, timed_collect


def _print_breakdown(timings: list[tuple[bool, float, float]], elapsed: float) -> None:
    print(f"timed run: {elapsed:.3f} s, {len(timings)} steps")
    for decode, label in ((True, "decode-only"), (False, "prefill/mixed")):
        rows = [t for t in timings if t[0] == decode]
        if rows:
            n = len(rows)
            print(
                f"  {label:13s} steps {n:3d}: dispatch {sum(r[1] for r in rows) / n * 1e3:6.2f} ms, "
                f"device wait {sum(r[2] for r in rows) / n * 1e3:6.2f} ms per step, "
                f"{sum(r[1] + r[2] for r in rows):.3f} s in all"
            )
    other = elapsed - sum(r[1] + r[2] for r in timings)
    print(f"  host work between steps (schedule, build, detokenize): {other:.3f} s")


def _ablate_attention() -> None:
    """Diagnostic only: every attention call returns its query, so the timed run costs everything but attention."""
    from jserve import ops

    def identity(q, *args, **kwargs):
        return q

    ops.ragged_paged_attention_items = identity
    ops.pallas_xla.ragged_paged_attention = identity
    ops.pallas_kernels.ragged_paged_attention = identity


def run_transformers(model_dir: Path, prompts: list[list[int]], args) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run_all() -> int:
        produced = 0
        for i in range(0, len(prompts), args.hf_batch_size):
            batch = prompts[i : i + args.hf_batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=args.output_len,
                    min_new_tokens=args.output_len,
                    do_sample=False,
                    pad_token_id=0,
                )
            produced += (out.shape[1] - width) * len(batch)
        return produced

    run_all()  # warm-up
    start = time.perf_counter()
    produced = run_all()
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt-len", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="print where jserve's timed run spent its steps")
    parser.add_argument(
        "--ablate-attention",
        action="store_true",
        help="diagnostic: attention returns its query (wrong tokens; shows the cost of everything else)",
    )
    parser.add_argument("--model", help="an existing HF checkpoint dir instead of the random model")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--emulate-cpu-devices",
        type=int,
        default=0,
        help="split the CPU into N devices (XLA_FLAGS) to try parallel layouts without accelerators",
    )
    args = parser.parse_args()
    if args.emulate_cpu_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.emulate_cpu_devices}"

    import jax

    if args.ablate_attention:
        _ablate_attention()
        print("ABLATED: attention returns its query; jserve's tokens are garbage, its figure a bound, not a result")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_model(Path(tmp) / "model", args)
        prompts = make_prompts(args)
        result = {
            "device": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
            "jax": jax.__version__,
            "layout": f"tp={args.tensor_parallel_size} pp={args.pipeline_parallel_size} dp={args.data_parallel_size}",
            "num_requests": args.num_requests,
            "output_len": args.output_len,
            "ablate_attention": args.ablate_attention,
        }
        result["jserve_tok_s"] = run_jserve(model_dir, prompts, args)
        print(f"jserve:       {result['jserve_tok_s']:9.1f} output tokens/s ({result['layout']}, {result['device']})")
        if not args.skip_transformers:
            result["transformers_tok_s"] = run_transformers(model_dir, prompts, args)
            result["ratio"] = result["jserve_tok_s"] / result["transformers_tok_s"]
            print(
                f"transformers: {result['transformers_tok_s']:9.1f} output tokens/s "
                f"(static batches of {args.hf_batch_size})"
            )
            label = " (ABLATED: attention removed, not a result)" if args.ablate_attention else ""
            print(f"ratio:        {result['ratio']:9.2f}x{label}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
