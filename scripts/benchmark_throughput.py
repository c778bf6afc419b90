#!/usr/bin/env python
"""Offline throughput: jserve's LLM.generate() against transformers' batched generate() on the same model.

Both run in this process on the same model (default: the bundled trained model, in float32), the same prompts
(random lengths in [min, max]) and the same number of output tokens (greedy, EOS ignored). jserve is timed on
the FIRST batch after ``LLM()`` returns (every program is compiled by then; nothing is warmed up by running
the workload) and then at steady state (median of --repeats further batches, prefix cache reset before each).
transformers runs once untimed, then timed, in left-padded static batches of --hf-batch-size. Prints output
tokens/s, time to ready, and the ratios.

    python scripts/benchmark_throughput.py [--num-requests 64] [--output-len 64] [--hf-batch-size 16]

``--breakdown``: host time on the critical path per decode step, with async scheduling on and off, at 1, 8 and
64 concurrent requests: (wall time per decode step) - (device time per step), where the device time is the same
step program replayed back to back with no host work in between. ``--ablate-attention`` makes every attention
call return its query unchanged (a diagnostic bound: the tokens it produces are meaningless).
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


def make_prompts(args, vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt_len, args.max_prompt_len + 1, size=args.num_requests)
    return [rng.integers(3, vocab_size, size=int(n)).tolist() for n in lengths]


def build_llm(model_dir: Path, args):
    from jserve import LLM

    return LLM(
        model=model_dir,
        dtype="float32",
        max_num_seqs=args.max_num_seqs,
        page_size=args.page_size,
        max_model_len=args.max_prompt_len + args.output_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        async_scheduling=args.async_scheduling,
        progress=False,
    )


def run_jserve(llm, prompts: list[list[int]], args) -> tuple[float, float]:
    """(first batch after ready, median steady-state batch) in output tokens/s."""
    from jserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    def timed() -> float:
        start = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
        return len(prompts) * args.output_len / elapsed

    first = timed()
    steady = []
    for _ in range(args.repeats):
        llm.engine.reset_prefix_cache()  # a timed batch must not reuse the previous batch's prompt pages
        steady.append(timed())
    return first, float(np.median(steady))


def breakdown(llm, args) -> list[dict]:
    """Host time on the critical path per decode step (see the module docstring)."""
    from jserve import SamplingParams

    engine = llm.engine
    rows = []
    for concurrency in (1, 8, 64):
        if concurrency > args.max_num_seqs:
            continue
        prompts = [[5 + (i * 7 + j) % 400 for j in range(16)] for i in range(concurrency)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        for mode in (False, True):
            engine.async_scheduling = mode
            for prompt in prompts:
                engine.add_request(prompt, params)
            running = engine.scheduler.running
            while engine.scheduler.num_waiting or not all(r.num_sampled > 1 for r in running):
                engine.step()  # admit and prefill everything: what is timed below is decode only
            captured = []
            dispatch = engine.runner.dispatch

            def capture(plans, previous=None, dispatch=dispatch, captured=captured):
                captured.append((plans, previous))
                return dispatch(plans, previous)

            engine.runner.dispatch = capture
            start, steps = time.perf_counter(), engine.num_steps
            while engine.has_unfinished():
                engine.step()
            wall = (time.perf_counter() - start) / max(1, engine.num_steps - steps)
            engine.runner.dispatch = dispatch
            device = _device_seconds_per_step(engine.runner, captured[len(captured) // 2])
            rows.append(
                dict(
                    concurrency=concurrency,
                    async_scheduling=mode,
                    step_ms=wall * 1e3,
                    device_ms=device * 1e3,
                    host_on_critical_path_ms=max(0.0, wall - device) * 1e3,
                )
            )
            engine.reset_prefix_cache()  # the replay above wrote into freed pages: forget them
    engine.async_scheduling = args.async_scheduling
    return rows


def _device_seconds_per_step(runner, captured, repeats: int = 30) -> float:
    """One decode step's program replayed back to back (no host work between): the device's time per step."""
    import jax

    plans, previous = captured
    pending = runner.dispatch(plans, previous)
    jax.block_until_ready(pending.outputs)
    start = time.perf_counter()
    for _ in range(repeats):
        pending = runner.dispatch(plans, pending if previous is not None else None)
    jax.block_until_ready(pending.outputs)
    return (time.perf_counter() - start) / repeats


def _ablate_attention() -> None:
    """Diagnostic only: every attention call returns its query, so the timed run costs everything but attention."""
    from jserve.attention.pallas import PallasBackend
    from jserve.attention.xla_page_loop import XlaPageLoopBackend
    from jserve.attention.xla_work_items import XlaWorkItemsBackend

    def identity(self, q, *args, **kwargs):
        return q

    for backend in (PallasBackend, XlaPageLoopBackend, XlaWorkItemsBackend):
        backend.attend = identity


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
    parser.add_argument("--repeats", type=int, default=3, help="steady-state batches (the median counts)")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--random-model", action="store_true", help="a random small Llama instead of the bundled model")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--breakdown", action="store_true", help="host time on the critical path per decode step")
    parser.add_argument(
        "--ablate-attention",
        action="store_true",
        help="diagnostic: attention returns its query (wrong tokens; shows the cost of everything else)",
    )
    parser.add_argument("--model", help="an HF checkpoint dir (default: the bundled trained model)")
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

    from jserve import BUNDLED_MODEL
    from jserve.config import ModelConfig

    if args.ablate_attention:
        _ablate_attention()
        print("ABLATED: attention returns its query; jserve's tokens are garbage, its figure a bound, not a result")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = make_model(Path(tmp) / "model", args) if args.random_model else Path(BUNDLED_MODEL)
        prompts = make_prompts(args, ModelConfig.from_pretrained(model_dir).vocab_size)
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "device": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
            "jax": jax.__version__,
            "model": model_dir.name,
            "layout": f"tp={args.tensor_parallel_size} pp={args.pipeline_parallel_size} dp={args.data_parallel_size}",
            "async_scheduling": args.async_scheduling,
            "num_requests": args.num_requests,
            "output_len": args.output_len,
            "ablate_attention": args.ablate_attention,
        }
        start = time.perf_counter()
        llm = build_llm(model_dir, args)
        result["time_to_ready_s"] = time.perf_counter() - start
        result["num_programs"] = llm.stats()["num_programs"]
        first, steady = run_jserve(llm, prompts, args)
        result.update(jserve_first_batch_tok_s=first, jserve_steady_tok_s=steady, first_over_steady=first / steady)
        assert llm.stats()["programs_lowered_while_serving"] == 0
        print(f"jserve: ready in {result['time_to_ready_s']:.1f} s ({result['num_programs']} programs)")
        print(f"jserve first batch: {first:9.1f} output tokens/s ({result['layout']}, {result['device']})")
        print(f"jserve steady:      {steady:9.1f} output tokens/s (first/steady {first / steady:.2f})")
        if args.breakdown:
            result["breakdown"] = breakdown(llm, args)
            for row in result["breakdown"]:
                print(
                    f"  concurrency {row['concurrency']:2d} async {'on ' if row['async_scheduling'] else 'off'}: "
                    f"step {row['step_ms']:6.2f} ms, device {row['device_ms']:6.2f} ms, "
                    f"host on the critical path {row['host_on_critical_path_ms']:6.2f} ms"
                )
        if not args.skip_transformers:
            hf = run_transformers(model_dir, prompts, args)
            result.update(transformers_tok_s=hf, first_over_hf=first / hf, steady_over_hf=steady / hf)
            label = " (ABLATED: attention removed, not a result)" if args.ablate_attention else ""
            print(f"transformers:       {hf:9.1f} output tokens/s (static batches of {args.hf_batch_size})")
            print(f"ratios: first batch {first / hf:.2f}x, steady {steady / hf:.2f}x transformers{label}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
