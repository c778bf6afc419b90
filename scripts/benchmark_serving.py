"""Online serving benchmark: a gRPC load generator against a running ``python -m jserve.launch``.

Requests arrive as a Poisson process at ``--request-rate`` (or all at once with ``inf``), optionally capped
at ``--max-concurrency`` in flight. Prompts are random token ids or the first human turn of a ShareGPT-format
JSON file (output length from the matching answer). The report uses the metric names of vLLM's
``benchmark_serving.py`` so numbers can be compared side by side: request throughput, output token throughput,
TTFT (time to first token), TPOT (time per output token after the first), ITL (gap between streamed chunks).

    python -m jserve.launch --port 9000 &
    python scripts/benchmark_serving.py --port 9000 --num-prompts 200 --request-rate 8
    python scripts/benchmark_serving.py --port 9000 --dataset-name sharegpt --dataset-path sg.json \\
        --max-concurrency 32 --protocol jetstream

``--protocol jetstream`` drives the JetStream-compatible ``Orchestrator.Decode`` instead of ``jserve.v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jserve.server.gen import jetstream_pb2, jetstream_pb2_grpc  # noqa: E402
from jserve.server.gen import jserve_pb2 as pb  # noqa: E402
from jserve.server.gen import jserve_pb2_grpc as pb_grpc  # noqa: E402


@dataclass
class Prompt:
    token_ids: list[int]
    output_len: int


@dataclass
class Result:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# ------------------------------------------------------------------ datasets


def random_prompts(
    n: int, input_len: int, output_len: int, range_ratio: float, vocab: int, rng: random.Random
) -> list[Prompt]:
    """Lengths uniform in [len * range_ratio, len]; ids avoid the first few (special) tokens."""
    low = 3 if vocab > 3 else 0
    out = []
    for _ in range(n):
        n_in = rng.randint(max(1, int(input_len * range_ratio)), input_len)
        n_out = rng.randint(max(1, int(output_len * range_ratio)), output_len)
        out.append(Prompt([rng.randrange(low, vocab) for _ in range(n_in)], n_out))
    return out


async def sharegpt_prompts(
    path: str,
    n: int,
    stub: pb_grpc.GenerationStub,
    max_model_len: int,
    fixed_output_len: int | None,
    rng: random.Random,
    metadata,
) -> list[Prompt]:
    """First human turn -> prompt, the reply's length -> output length; vLLM's filters (4 <= lengths,
    prompt <= 1024, prompt + output <= 2048, and within max_model_len)."""
    data = json.loads(Path(path).read_text())
    pairs = [
        (c["conversations"][0]["value"], c["conversations"][1]["value"])
        for c in data
        if len(c.get("conversations", [])) >= 2
    ]
    rng.shuffle(pairs)
    out: list[Prompt] = []
    for question, answer in pairs:
        if len(out) == n:
            break
        ids = list((await stub.Tokenize(pb.TokenizeRequest(text=question), metadata=metadata)).token_ids)
        if fixed_output_len:
            n_out = fixed_output_len
        else:
            reply = await stub.Tokenize(pb.TokenizeRequest(text=answer, add_special_tokens=False), metadata=metadata)
            n_out = len(reply.token_ids)
        if len(ids) < 4 or n_out < 4 or len(ids) > 1024 or len(ids) + n_out > min(2048, max_model_len):
            continue
        out.append(Prompt(ids, n_out))
    if len(out) < n:
        print(f"note: only {len(out)} ShareGPT prompts pass the length filters", file=sys.stderr)
    return out


# ------------------------------------------------------------------ one request


async def run_jserve(stub, prompt: Prompt, args, metadata) -> Result:
    request = pb.GenerateRequest(
        token_ids=prompt.token_ids,
        sampling=pb.SamplingParams(
            max_tokens=prompt.output_len, temperature=args.temperature, ignore_eos=args.ignore_eos
        ),
    )
    return await _timed(stub.Generate(request, metadata=metadata), prompt, lambda r: len(r.token_ids))


async def run_jetstream(stub, prompt: Prompt, args, metadata) -> Result:
    request = jetstream_pb2.DecodeRequest(
        max_tokens=prompt.output_len, token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=prompt.token_ids)
    )
    return await _timed(
        stub.Decode(request, metadata=metadata),
        prompt,
        lambda r: sum(len(s.token_ids) for s in r.stream_content.samples),
    )


async def _timed(call, prompt: Prompt, count) -> Result:
    result = Result(prompt_len=len(prompt.token_ids))
    start = last = time.perf_counter()
    try:
        async for response in call:
            n = count(response)
            if not n:
                continue
            now = time.perf_counter()
            if result.output_len == 0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
            result.output_len += n
        result.latency = time.perf_counter() - start
        result.ok = result.output_len > 0
    except grpc.aio.AioRpcError as e:
        result.error = f"{e.code().name}: {e.details()}"
    return result


# ------------------------------------------------------------------ load


async def arrivals(n: int, rate: float, burstiness: float, rng: np.random.Generator):
    """Yields request indices with gamma-distributed gaps (burstiness 1 = Poisson) at mean rate ``rate``."""
    for i in range(n):
        yield i
        if rate != float("inf") and i < n - 1:
            await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))


async def benchmark(args) -> dict:
    rng = random.Random(args.seed)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    target = f"{args.host}:{args.port}"
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        channel = grpc.aio.secure_channel(target, credentials)
    else:
        channel = grpc.aio.insecure_channel(target)
    async with channel:
        stub = pb_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
        if args.dataset_name == "sharegpt":
            if not args.dataset_path:
                raise SystemExit("--dataset-path is required with --dataset-name sharegpt")
            prompts = await sharegpt_prompts(
                args.dataset_path, args.num_prompts, stub, info.max_model_len, args.sharegpt_output_len, rng, metadata
            )
        else:
            prompts = random_prompts(
                args.num_prompts,
                args.random_input_len,
                args.random_output_len,
                args.random_range_ratio,
                info.vocab_size,
                rng,
            )
        if args.protocol == "jetstream":
            run, target_stub = run_jetstream, jetstream_pb2_grpc.OrchestratorStub(channel)
        else:
            run, target_stub = run_jserve, stub
        print(
            f"model {info.model_name} on {info.parallel.platform}; {len(prompts)} prompts, "
            f"request rate {args.request_rate}, max concurrency {args.max_concurrency}",
            file=sys.stderr,
        )
        probe = await run(target_stub, Prompt(prompts[0].token_ids, min(4, prompts[0].output_len)), args, metadata)
        if not probe.ok:
            raise SystemExit(f"test request failed: {probe.error}")

        limit = asyncio.Semaphore(args.max_concurrency or len(prompts))

        async def limited(prompt: Prompt) -> Result:
            async with limit:
                return await run(target_stub, prompt, args, metadata)

        start = time.perf_counter()
        tasks = []
        async for i in arrivals(len(prompts), args.request_rate, args.burstiness, np.random.default_rng(args.seed)):
            tasks.append(asyncio.create_task(limited(prompts[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, args)


# ------------------------------------------------------------------ report


def summarize(results: list[Result], duration: float, args) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: [1000.0 * x for x in xs]
    ttft = ms([r.ttft for r in ok])
    tpot = ms([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])
    itl = ms([x for r in ok for x in r.itl])
    e2el = ms([r.latency for r in ok])
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    stats = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        arr = np.asarray(values or [0.0])
        stats[f"mean_{name}_ms"] = float(arr.mean())
        stats[f"median_{name}_ms"] = float(np.median(arr))
        stats[f"p99_{name}_ms"] = float(np.percentile(arr, 99))
    return stats


def print_report(s: dict) -> None:
    line = lambda label, value: print(f"{label:<40}{value:<10}")
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    line("Successful requests:", s["completed"])
    line("Failed requests:", s["failed"])
    line("Benchmark duration (s):", f"{s['duration']:.2f}")
    line("Total input tokens:", s["total_input_tokens"])
    line("Total generated tokens:", s["total_output_tokens"])
    line("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    line("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    line("Total Token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    for key, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        print("{s:{c}^50}".format(s=title, c="-"))
        upper = key.upper()
        line(f"Mean {upper} (ms):", f"{s[f'mean_{key}_ms']:.2f}")
        line(f"Median {upper} (ms):", f"{s[f'median_{key}_ms']:.2f}")
        line(f"P99 {upper} (ms):", f"{s[f'p99_{key}_ms']:.2f}")
    print("=" * 50)
    for error in s["errors"]:
        print(f"error: {error}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--tls-ca", default=None, help="PEM root certificate: connect with TLS")
    p.add_argument("--protocol", choices=["jserve", "jetstream"], default="jserve")
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override the answers' lengths")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=1.0)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly the requested output length (jserve protocol only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", default=None, help="also write the numbers as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stats = asyncio.run(benchmark(args))
    print_report(stats)
    if args.save_result:
        Path(args.save_result).write_text(json.dumps({"args": vars(args), **stats}, indent=2, default=str))
    return 0 if stats["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
