#!/usr/bin/env python
"""Time to ready: ``python -m jserve.launch`` (bundled model) from process start to its ``jserve: ready`` line,
with a cold and then a warm jax compilation cache (a fresh temporary directory), and the README's one-line
``LLM().generate(...)`` example with the warm cache.

    python scripts/benchmark_startup.py [--runs 2] [-- extra launch flags]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_LINER = (
    "from jserve import LLM, SamplingParams; print(LLM().generate('def fibonacci(n):\\n', "
    "SamplingParams(max_tokens=48, temperature=0, repetition_penalty=1.2))[0].outputs[0].text)"
)


def launch_until_ready(cache: str, extra: list[str]) -> float:
    env = {**os.environ, "JSERVE_COMPILATION_CACHE_DIR": cache, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jserve.launch", "--port", "0", "--no-progress", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("jserve: ready"):
                return time.perf_counter() - start
        raise RuntimeError(f"server exited with {proc.wait()} before it was ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def one_liner(cache: str) -> float:
    env = {**os.environ, "JSERVE_COMPILATION_CACHE_DIR": cache}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", ONE_LINER], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="warm runs (the best counts)")
    parser.add_argument("--json")
    parser.add_argument("extra", nargs="*", help="extra launch flags (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        result = {"date": time.strftime("%Y-%m-%d"), "cold_s": launch_until_ready(cache, args.extra)}
        result["warm_s"] = min(launch_until_ready(cache, args.extra) for _ in range(args.runs))
        result["one_liner_warm_s"] = min(one_liner(cache) for _ in range(args.runs))
    print(
        f"launch: cold {result['cold_s']:.1f} s, warm {result['warm_s']:.1f} s; "
        f"README one-liner (warm): {result['one_liner_warm_s']:.1f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
