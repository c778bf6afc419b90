#!/usr/bin/env python
"""Time to ready: ``python -m jserve.launch`` (bundled model) from process start to its ``jserve: ready`` line,
and to every program built (``/metrics``), with a cold and then a warm cache (a fresh temporary directory),
and the README's one-line ``LLM().generate(...)`` example with the warm cache. ``--depths``: also ``LLM()`` of
random Llamas at those depths, with unrolled and with scanned layers (``scan_layers``), and scanned layers'
decode speed against unrolled on the bundled model.

    python scripts/benchmark_startup.py [--runs 2] [--depths 4 32] [-- extra launch flags]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_LINER = (
    "from jserve import LLM, SamplingParams; print(LLM().generate('def fibonacci(n):\\n', "
    "SamplingParams(max_tokens=48, temperature=0, repetition_penalty=1.2))[0].outputs[0].text)"
)


def launch_until_ready(cache: str, extra: list[str]) -> tuple[float, float]:
    """(seconds to ``jserve: ready``, seconds until /metrics shows every program built)."""
    env = {**os.environ, "JSERVE_COMPILATION_CACHE_DIR": cache, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jserve.launch", "--port", "0", "--metrics-port", "0", "--no-progress", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        metrics_url = None
        for line in proc.stdout:
            if m := re.search(r"listening on (http://\S+/metrics)", line):
                metrics_url = m.group(1)
            if line.startswith("jserve: ready"):
                ready = time.perf_counter() - start
                return ready, _until_all_built(metrics_url, start)
        raise RuntimeError(f"server exited with {proc.wait()} before it was ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _until_all_built(metrics_url: str, start: float, timeout: float = 600) -> float:
    """Polls /metrics until jserve:compiled_programs reaches jserve:compiled_programs_expected."""
    while time.perf_counter() - start < timeout:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        built = re.search(r"^jserve:compiled_programs(?:\{[^}]*\})? (\S+)", text, re.M)
        total = re.search(r"^jserve:compiled_programs_expected(?:\{[^}]*\})? (\S+)", text, re.M)
        if built and total and float(built.group(1)) >= float(total.group(1)):
            return time.perf_counter() - start
        time.sleep(0.1)
    raise RuntimeError("programs still building after the timeout")


def one_liner(cache: str) -> float:
    env = {**os.environ, "JSERVE_COMPILATION_CACHE_DIR": cache}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", ONE_LINER], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


DEPTH_PROBE = (
    "import sys, time; t = time.perf_counter(); from jserve import LLM; "
    "LLM(sys.argv[1], dtype='float32', max_model_len=256, max_num_seqs=8, progress=False, "
    "scan_layers=sys.argv[2] == 'scan'); "
    "print(time.perf_counter() - t)"
)


def scan_decode_ratios(repeats: int = 5) -> dict[int, float]:
    """{batch: decode tokens/s with scan_layers over unrolled} on the bundled model (float32, greedy, 32-token
    prompts; both engines in this process, runs alternating, median of ``repeats``)."""
    import numpy as np

    from jserve import LLM, SamplingParams

    engines = {
        scan: LLM(dtype="float32", max_model_len=512, max_num_seqs=16, progress=False, scan_layers=scan)
        for scan in (False, True)
    }
    rng = np.random.default_rng(0)

    def tokens_per_s(llm, batch: int, new_tokens: int) -> float:
        ids = [rng.integers(5, 2000, 32).tolist() for _ in range(batch)]
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompt_token_ids=ids, sampling_params=params, use_tqdm=False)
        return batch * new_tokens / (time.perf_counter() - start)

    ratios = {}
    for batch, new_tokens in ((1, 192), (16, 64)):
        runs = {False: [], True: []}
        for _ in range(repeats):
            for scan, llm in engines.items():
                runs[scan].append(tokens_per_s(llm, batch, new_tokens))
        ratios[batch] = statistics.median(runs[True]) / statistics.median(runs[False])
    return ratios


def depth_costs(layers: list[int], mode: str) -> dict[int, tuple[float, float]]:
    """{layers: (cold, warm) seconds of ``LLM()``} for random Llamas of hidden size 64 that differ only in depth
    (each with its own fresh cache); imports included. ``mode``: 'scan' (scan_layers) or 'unrolled'."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    costs = {}
    with tempfile.TemporaryDirectory() as root:
        for n in layers:
            path = Path(root) / f"llama-{n}"
            config = LlamaConfig(
                hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
            )  # fmt: skip
            torch.manual_seed(0)
            LlamaForCausalLM(config).save_pretrained(path)
            env = {**os.environ, "JSERVE_COMPILATION_CACHE_DIR": str(Path(root) / f"cache-{n}")}
            run = [sys.executable, "-c", DEPTH_PROBE, str(path), mode]
            cold, warm = (
                float(subprocess.run(run, env=env, check=True, capture_output=True, text=True).stdout) for _ in range(2)
            )
            costs[n] = (cold, warm)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="warm runs (the best counts)")
    parser.add_argument("--json")
    parser.add_argument("--depths", type=int, nargs="*", default=[], help="also time LLM() at these layer counts")
    parser.add_argument("extra", nargs="*", help="extra launch flags (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold, cold_all = launch_until_ready(cache, args.extra)
        result = {"date": time.strftime("%Y-%m-%d"), "cold_s": cold, "cold_all_built_s": cold_all}
        warm = [launch_until_ready(cache, args.extra) for _ in range(args.runs)]
        result["warm_s"] = min(w[0] for w in warm)
        result["warm_all_built_s"] = min(w[1] for w in warm)
        result["one_liner_warm_s"] = min(one_liner(cache) for _ in range(args.runs))
    print(
        f"launch: cold {result['cold_s']:.1f} s (all programs built {result['cold_all_built_s']:.1f} s), "
        f"warm {result['warm_s']:.1f} s (all built {result['warm_all_built_s']:.1f} s); "
        f"README one-liner (warm): {result['one_liner_warm_s']:.1f} s"
    )
    if args.depths:
        result["depth_s"] = {mode: depth_costs(args.depths, mode) for mode in ("unrolled", "scan")}
        for mode, costs in result["depth_s"].items():
            for n, (cold, warm) in costs.items():
                print(f"LLM(), {n} layers (hidden 64), {mode}: cold {cold:.1f} s, warm {warm:.1f} s")
        result["scan_decode_ratio"] = scan_decode_ratios()
        for batch, ratio in result["scan_decode_ratio"].items():
            print(f"decode tokens/s with scan_layers / unrolled, bundled model, batch {batch}: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
