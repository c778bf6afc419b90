#!/usr/bin/env python
"""The engine's host work per step: what an accelerator's step would wait for once the device is fast.

Runs ``LLM.generate`` on ROWS seeded prompts of 16-128 tokens, ``--tokens`` greedy tokens each (EOS ignored),
and reports per engine step:

* **main-thread CPU**: CPU time of the thread that schedules, builds, dispatches and reports steps
  (``time.thread_time``), which excludes waiting for the device and XLA's own threads: the figure to compare
  between commits (on a shared 2-core CPU it moves ~5%, wall-clock host time ~10%);
* **host wall**: the run's wall time minus the time blocked in ``ModelRunner.collect`` (waiting for results);
* the run's output tokens per second.

Median of ``--rounds`` runs, prefix cache reset before each. To compare two checkouts in one session, run the
script with ``PYTHONPATH`` pointing at each in turn, alternating.

    python scripts/benchmark_host.py [--model bundled|llama-159m|DIR] [--rows 256] [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure(llm, prompts: list[list[int]], tokens: int) -> dict:
    """One timed ``generate``: main-thread CPU and host wall time per step, and output tokens per second."""
    from jserve import SamplingParams

    runner = llm.engine.runner
    collect, waited = runner.collect, [0.0]

    def timed_collect(*args, **kwargs):
        start = time.perf_counter()
        try:
            return collect(*args, **kwargs)
        finally:
            waited[0] += time.perf_counter() - start

    params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
    llm.engine.reset_prefix_cache()
    steps_before = llm.engine.num_steps
    runner.collect = timed_collect
    try:
        cpu, wall = time.thread_time(), time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    finally:
        runner.collect = collect
    steps = llm.engine.num_steps - steps_before
    return {
        "cpu_ms": cpu / steps * 1e3,
        "host_ms": (wall - waited[0]) / steps * 1e3,
        "steps": steps,
        "tok_s": len(prompts) * tokens / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="bundled, llama-159m, or a checkpoint directory")
    parser.add_argument("--rows", type=int, default=256, help="requests, all at once (max_num_seqs too)")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from benchmark_vs_vllm import MAX_MODEL_LEN, make_prompts, model_dir  # scripts/, next to this one

    from jserve import LLM, SamplingParams

    llm = LLM(model_dir(args.model), dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=args.rows)
    prompts = make_prompts(args.rows, llm.engine.vocab_size)
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=4), use_tqdm=False)
    runs = [measure(llm, prompts, args.tokens) for _ in range(args.rounds)]
    median = {key: statistics.median(run[key] for run in runs) for key in ("cpu_ms", "host_ms", "tok_s")}
    print(
        f"{args.model}, {args.rows} x {args.tokens}: main-thread CPU {median['cpu_ms']:.2f} ms/step "
        f"({', '.join(format(r['cpu_ms'], '.2f') for r in runs)}), host wall {median['host_ms']:.2f} ms/step, "
        f"{runs[0]['steps']} steps, {median['tok_s']:.0f} tok/s"
    )


if __name__ == "__main__":
    main()
