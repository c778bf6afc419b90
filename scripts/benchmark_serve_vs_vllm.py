#!/usr/bin/env python
"""``vllm bench serve`` against ``python -m jserve.launch`` and against ``vllm serve``: same model, same requests.

A real client on the server path: vLLM's own benchmark client (random dataset, OpenAI completions API, EOS
ignored) sends the same seeded requests at each ``--request-rates`` to one server at a time, jserve first, then
vLLM (each started fresh, float32, ``max_model_len`` 512, ``max_num_seqs`` 64, 1 GiB of KV). The table gives
output throughput, TTFT and TPOT p50 / p99 and failed requests side by side. vLLM's CLI runs from the venv given
by ``--vllm-python`` through ``../shared/tools/vllm_cli.py`` (its version lookup; how to make the venv:
docs/benchmarks.md, "vLLM on CPU").

    python scripts/benchmark_serve_vs_vllm.py --vllm-python /opt/vllm-venv/bin/python [--model bundled]
        [--request-rates 4,inf] [--num-prompts 64] [--input-len 64] [--output-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_vs_vllm import KV_CACHE_GIB, MAX_MODEL_LEN, model_dir, vllm_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VLLM_CLI = REPO.parent / "shared" / "tools" / "vllm_cli.py"
MAX_NUM_SEQS = 64
SERVED_NAME = "bench-model"
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s")


def jserve_server(model: str, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jserve.launch", "--model", model, "--dtype", "float32", "--port", "0"]
    cmd += ["--http-port", str(port), "--served-model-name", SERVED_NAME, "--max-model-len", str(MAX_MODEL_LEN)]
    cmd += ["--max-num-seqs", str(MAX_NUM_SEQS), "--no-progress"]
    return subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO)


def vllm_server(python: str, model: str, port: int, log) -> subprocess.Popen:
    cmd = [python, str(VLLM_CLI), "serve", model, "--port", str(port), "--dtype", "float32"]
    cmd += ["--served-model-name", SERVED_NAME, "--max-model-len", str(MAX_MODEL_LEN)]
    cmd += ["--max-num-seqs", str(MAX_NUM_SEQS)]
    return subprocess.Popen(cmd, stdout=log, stderr=log, env=vllm_env())


def bench(args, model: str, port: int, rate: str, out_dir: Path) -> dict:
    """One ``vllm bench serve`` run; its saved result JSON."""
    name = f"result-{port}-{rate}.json"
    cmd = [args.vllm_python, str(VLLM_CLI), "bench", "serve", "--backend", "openai", "--base-url"]
    cmd += [f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions", "--model", SERVED_NAME]
    cmd += ["--tokenizer", model, "--dataset-name", "random", "--random-input-len", str(args.input_len)]
    cmd += ["--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts)]
    cmd += ["--request-rate", rate, "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(out_dir)]
    cmd += ["--result-filename", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env())
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads((out_dir / name).read_text())


def run_engine(args, engine: str, model: str, out_dir: Path) -> dict[str, dict]:
    port = free_port()
    with open(out_dir / f"{engine}.log", "w") as log:
        if engine == "jserve":
            proc = jserve_server(model, port, log)
        else:
            proc = vllm_server(args.vllm_python, model, port, log)
        try:
            wait_healthy(port, proc)
            return {rate: bench(args, model, port, rate, out_dir) for rate in args.request_rates.split(",")}
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def table(results: dict[str, dict[str, dict]], num_prompts: int) -> str:
    lines = [
        "| request rate | engine | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in results["jserve"]:
        for engine in results:
            r = results[engine][rate]
            cells = " | ".join(f"{r[m]:.1f}" for m in METRICS)
            lines.append(f"| {rate} | {engine} | {cells} | {num_prompts - r['completed']} |")
        ratio = results["jserve"][rate]["output_throughput"] / results["vllm"][rate]["output_throughput"]
        lines.append(f"| {rate} | jserve / vLLM throughput | **{ratio:.2f}x** | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--request-rates", default="4,inf")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    if not Path(args.vllm_python).exists():
        sys.exit(f"--vllm-python {args.vllm_python} does not exist")
    model = model_dir(args.model)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
    out_dir = Path(tempfile.mkdtemp(prefix="jserve-serve-bench-"))
    results = {engine: run_engine(args, engine, model, out_dir) for engine in ("jserve", "vllm")}
    print(table(results, args.num_prompts))
    print(f"(logs and vLLM's result files: {out_dir})", file=sys.stderr)


if __name__ == "__main__":
    main()
