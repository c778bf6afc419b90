#!/usr/bin/env python
"""Benchmark the Pallas attention kernels against XLA / cuDNN on one GPU, every figure from the same run.

Figures (issue "Pallas kernels", section Benchmark):

1. device copy bandwidth (a large on-device copy; bytes read + written per second), measured first; 2. paged
decode attention, batch 64, context 2048, 32 query heads / 8 KV heads, head_dim 128, bf16: bytes of K/V read
per second as a share of (1) (goal >= 70%), next to the XLA path; 3. flash attention prefill, causal, 4096
tokens, 32 heads, head_dim 128, bf16: TFLOP/s against ``jax.nn.dot_product_attention(implementation="cudnn")``
(goal >= 0.8x); 4. a ragged mixed step (4 prefill chunks of 512 + 60 decode tokens over 2k contexts) against
the XLA path; 5. a decode step of a 1B-shaped decoder (Llama-3.2-1B dimensions, random bf16 weights, batch 64,
context 2048) with Pallas vs XLA attention; the model is defined here so the figure isolates the attention
backend.

On a machine without a GPU the script says so and exits; ``--cpu-smoke`` runs the same code paths on tiny
shapes with the kernels under their interpreters, to check the script itself (its timings are not performance
figures). ``--markdown PATH`` appends the results, with device, jax version and date, to PATH (e.g.
docs/benchmarks.md).

Usage: python scripts/benchmark_kernels.py [--cpu-smoke] [--markdown docs/benchmarks.md] [--only decode,flash]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels import reference  # noqa: E402

try:  # the engine's XLA path (blocked online softmax); the gather-all reference otherwise
    from pallas_kernels import xla as xla_path

    XLA_RAGGED = xla_path.ragged_paged_attention
except ImportError:  # pragma: no cover
    XLA_RAGGED = reference.ragged_paged_attention


@dataclasses.dataclass
class Shapes:
    decode_batch: int = 64
    context: int = 2048
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    prefill_tokens: int = 4096
    prefill_heads: int = 32
    chunks: int = 4
    chunk_len: int = 512
    decode_tokens: int = 60
    copy_bytes: int = 1 << 30
    # 1B-shaped model (Llama-3.2-1B)
    layers: int = 16
    model_dim: int = 2048
    model_heads: int = 32
    model_kv_heads: int = 8
    model_head_dim: int = 64
    mlp_dim: int = 8192
    vocab: int = 128256


SMOKE = Shapes(
    decode_batch=4,
    context=80,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    page_size=16,
    prefill_tokens=128,
    prefill_heads=4,
    chunks=2,
    chunk_len=24,
    decode_tokens=3,
    copy_bytes=1 << 20,
    layers=2,
    model_dim=128,
    model_heads=4,
    model_kv_heads=2,
    model_head_dim=64,
    mlp_dim=256,
    vocab=512,
)


def timeit(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median seconds per call (each call synchronised)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timeit_decode_steps(step, params, k_cache, v_cache, tokens, *, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of a decode step that donates its KV caches: each call gets the caches the
    previous one returned (a donated input is deleted), as the engine's steps do."""
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        _, new_k, new_v = jax.block_until_ready(step(params, k_cache, v_cache, tokens))
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if i == 0 and not all(c.is_deleted() for c in (*k_cache, *v_cache)):
            print("warning: the decode step did not donate its KV caches; it copies them every call", file=sys.stderr)
        k_cache, v_cache = new_k, new_v
    return statistics.median(times)


def try_time(fn, *args, iters: int, timer=timeit) -> float | str:
    try:
        return timer(fn, *args, iters=iters)
    except Exception as err:  # noqa: BLE001 - a baseline that cannot run (OOM, no cuDNN) is reported, not fatal
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"


def fmt_time(t: float | str) -> str:
    return t if isinstance(t, str) else f"{t * 1e3:.3f} ms"


def paged_cache(rng, shapes: Shapes, num_kv_heads: int, head_dim: int, seq_lens: list[int], dtype=jnp.bfloat16):
    """A cache holding the given sequences on shuffled pages (page 0 is the null page)."""
    page = shapes.page_size
    pages_per_seq = [-(-n // page) for n in seq_lens]
    max_pages = max(pages_per_seq)
    num_pages = 1 + sum(pages_per_seq)
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((len(seq_lens), max_pages), np.int32)
    cursor = 0
    for i, n in enumerate(pages_per_seq):
        tables[i, :n] = perm[cursor : cursor + n]
        cursor += n
    key = jax.random.key(int(rng.integers(1 << 30)))
    kk, vk = jax.random.split(key)
    shape = (num_kv_heads, num_pages, page, head_dim)
    k_pages = jax.random.normal(kk, shape, dtype)
    v_pages = jax.random.normal(vk, shape, dtype)
    return k_pages, v_pages, jnp.asarray(tables)


# ---------------------------------------------------------------------------------------------------- figures
def bench_copy(shapes: Shapes, iters: int) -> dict:
    n = shapes.copy_bytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)  # one read + one write per element
    t = timeit(copy, x, iters=iters)
    return {"copy_bandwidth_GBps": 2 * n * 4 / t / 1e9, "copy_time": t}


def bench_decode(shapes: Shapes, backend: str, interpret: bool, iters: int, copy_bw: float) -> dict:
    rng = np.random.default_rng(0)
    lens = [shapes.context] * shapes.decode_batch
    k_pages, v_pages, tables = paged_cache(rng, shapes, shapes.num_kv_heads, shapes.head_dim, lens)
    q = jax.random.normal(jax.random.key(1), (shapes.decode_batch, shapes.num_heads, shapes.head_dim), jnp.bfloat16)
    lengths = jnp.asarray(lens, jnp.int32)
    kernel = jax.jit(functools.partial(pallas_kernels.paged_attention, backend=backend, interpret=interpret))
    cu = jnp.arange(shapes.decode_batch + 1, dtype=jnp.int32)
    num = jnp.array([shapes.decode_batch], jnp.int32)
    xla = jax.jit(lambda q, k, v, lens, bt: XLA_RAGGED(q, k, v, lens, bt, cu, num))
    t_kernel = timeit(kernel, q, k_pages, v_pages, lengths, tables, iters=iters)
    t_xla = try_time(xla, q, k_pages, v_pages, lengths, tables, iters=iters)
    kv_bytes = 2 * shapes.decode_batch * shapes.context * shapes.num_kv_heads * shapes.head_dim * 2
    io_bytes = kv_bytes + 2 * q.size * 2 + shapes.decode_batch * tables.shape[1] * 4
    achieved = io_bytes / t_kernel / 1e9
    out = {
        "kernel": t_kernel,
        "xla": t_xla,
        "achieved_GBps": achieved,
        "share_of_copy_bw": achieved / copy_bw,
    }
    if not isinstance(t_xla, str):
        out["speedup_vs_xla"] = t_xla / t_kernel
    return out


def bench_flash(shapes: Shapes, backend: str, interpret: bool, iters: int, on_gpu: bool) -> dict:
    key = jax.random.key(2)
    shape = (1, shapes.prefill_tokens, shapes.prefill_heads, shapes.head_dim)
    q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in jax.random.split(key, 3))
    kernel = jax.jit(
        functools.partial(pallas_kernels.flash_attention, causal=True, backend=backend, interpret=interpret)
    )
    t_kernel = timeit(kernel, q, k, v, iters=iters)
    flops = 4 * shapes.prefill_heads * shapes.prefill_tokens**2 * shapes.head_dim / 2  # causal: half the matrix
    out = {"kernel": t_kernel, "kernel_TFLOPs": flops / t_kernel / 1e12}
    if on_gpu:
        cudnn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"))
        t_cudnn = try_time(cudnn, q, k, v, iters=iters)
        out["cudnn"] = t_cudnn
        if not isinstance(t_cudnn, str):
            out["cudnn_TFLOPs"] = flops / t_cudnn / 1e12
            out["ratio_vs_cudnn"] = t_cudnn / t_kernel
    xla = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla"))
    out["xla"] = try_time(xla, q, k, v, iters=iters)
    return out


def bench_ragged(shapes: Shapes, backend: str, interpret: bool, iters: int) -> dict:
    rng = np.random.default_rng(3)
    q_lens = [shapes.chunk_len] * shapes.chunks + [1] * shapes.decode_tokens
    kv_lens = [shapes.context] * len(q_lens)
    k_pages, v_pages, tables = paged_cache(rng, shapes, shapes.num_kv_heads, shapes.head_dim, kv_lens)
    total = sum(q_lens)
    padded = -(-total // 64) * 64  # the engine pads T to a bucket
    q = jax.random.normal(jax.random.key(4), (padded, shapes.num_heads, shapes.head_dim), jnp.bfloat16)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    args = (
        q,
        k_pages,
        v_pages,
        jnp.asarray(kv_lens, jnp.int32),
        tables,
        cu,
        jnp.array([len(q_lens)], jnp.int32),
    )
    kernel = jax.jit(functools.partial(pallas_kernels.ragged_paged_attention, backend=backend, interpret=interpret))
    t_kernel = timeit(kernel, *args, iters=iters)
    t_xla = try_time(jax.jit(XLA_RAGGED), *args, iters=iters)
    out = {"kernel": t_kernel, "xla": t_xla, "tokens": total}
    if not isinstance(t_xla, str):
        out["speedup_vs_xla"] = t_xla / t_kernel
    return out


def _rms(x, w):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5) * w).astype(x.dtype)


def bench_model(shapes: Shapes, backend: str, interpret: bool, iters: int) -> dict:
    """One decode step (batch B, one token each) of a Llama-shaped decoder over a paged cache.

    As in the engine (``jserve/models/llama.py``), layers are unrolled and each has its own weights and K/V
    page buffers, which the jitted step donates: XLA then writes the new tokens' K/V in place, and the step
    costs what a serving step costs. (A ``lax.scan`` over stacked [layers, ...] caches rewrites the whole cache
    every step, donated or not, at least on XLA CPU; that copy would hide the difference between the backends.)
    """
    s = shapes
    rng = np.random.default_rng(5)
    batch = s.decode_batch
    key = jax.random.key(6)
    ks = jax.random.split(key, 8)
    d, n, kv, h, f = s.model_dim, s.model_heads, s.model_kv_heads, s.model_head_dim, s.mlp_dim
    init = lambda k, shape: (jax.random.normal(k, shape, jnp.float32) * shape[-2] ** -0.5).astype(jnp.bfloat16)
    layer_keys = jax.random.split(ks[1], s.layers)

    def layer_params(key):
        kq, kkv, ko, kup, kdown = jax.random.split(key, 5)
        return {
            "wq": init(kq, (d, n * h)),
            "wkv": init(kkv, (d, 2 * kv * h)),
            "wo": init(ko, (n * h, d)),
            "w_up": init(kup, (d, 2 * f)),
            "w_down": init(kdown, (f, d)),
            "norm": jnp.ones((2, d), jnp.float32),
        }

    params = {
        "embed": init(ks[0], (s.vocab, d)),
        "layers": [layer_params(key) for key in layer_keys],
        "head": init(ks[6], (d, s.vocab)),
    }
    lens = [s.context] * batch
    page = s.page_size
    k_pages, v_pages, tables = paged_cache(rng, s, kv, h, lens)
    lengths = jnp.asarray(lens, jnp.int32)
    positions = lengths - 1
    slots = tables[jnp.arange(batch), positions // page] * page + positions % page
    tokens = jnp.asarray(rng.integers(0, s.vocab, batch), jnp.int32)
    cu = jnp.arange(batch + 1, dtype=jnp.int32)
    num = jnp.array([batch], jnp.int32)

    def step(params, k_cache, v_cache, tokens, attention):
        x = params["embed"][tokens]
        new_k, new_v = [], []
        for w, kc, vc in zip(params["layers"], k_cache, v_cache, strict=True):
            y = _rms(x, w["norm"][0])
            q = (y @ w["wq"]).reshape(batch, n, h)
            k, v = jnp.split((y @ w["wkv"]).reshape(batch, 2 * kv, h), 2, axis=1)
            kc, vc = reference.write_to_pages(kc, vc, k, v, slots)
            o = attention(q, kc, vc).reshape(batch, n * h)
            x = x + o @ w["wo"]
            up, gate = jnp.split(_rms(x, w["norm"][1]) @ w["w_up"], 2, axis=-1)
            x = x + (jax.nn.silu(gate) * up) @ w["w_down"]
            new_k.append(kc)
            new_v.append(vc)
        logits = _rms(x, 1.0) @ params["head"]
        return jnp.argmax(logits, axis=-1), new_k, new_v

    pallas_attn = functools.partial(
        pallas_kernels.paged_attention,
        lengths=lengths,
        block_tables=tables,
        backend=backend,
        interpret=interpret,
    )
    xla_attn = lambda q, kc, vc: XLA_RAGGED(q, kc, vc, lengths, tables, cu, num)
    out = {}
    for name, attention in (("pallas", pallas_attn), ("xla", xla_attn)):
        fn = jax.jit(functools.partial(step, attention=attention), donate_argnums=(1, 2))
        # fresh per-layer buffers for each backend: the step donates (consumes) the caches it is given
        k_cache = [jnp.copy(k_pages) for _ in range(s.layers)]
        v_cache = [jnp.copy(v_pages) for _ in range(s.layers)]
        out[name] = try_time(fn, params, k_cache, v_cache, tokens, iters=iters, timer=timeit_decode_steps)
        del k_cache, v_cache
    if not isinstance(out["xla"], str) and not isinstance(out["pallas"], str):
        out["speedup_vs_xla"] = out["xla"] / out["pallas"]
    return out


# ----------------------------------------------------------------------------------------------------- main
def describe_device() -> str:
    dev = jax.devices()[0]
    extra = getattr(dev, "compute_capability", None)
    return f"{dev.device_kind} ({dev.platform}{', sm ' + str(extra) if extra else ''})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, kernels under interpreters")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--only", default="copy,decode,flash,ragged,model")
    parser.add_argument("--markdown", default=None, help="append a results section to this file")
    args = parser.parse_args(argv)

    platform = jax.devices()[0].platform
    on_gpu = platform == "gpu"
    if not on_gpu and not args.cpu_smoke:
        print(
            f"benchmark_kernels: needs an NVIDIA Hopper GPU (found {describe_device()}); "
            "no figures produced.\n"
            "Run with --cpu-smoke to exercise the script on tiny shapes under the kernel interpreters."
        )
        return 0
    if on_gpu:
        capability = getattr(jax.devices()[0], "compute_capability", "0")
        if float(capability) < 9.0:
            print(f"benchmark_kernels: the Mosaic GPU kernels need Hopper (sm 9.0+), found sm {capability}.")
            return 0
    shapes = Shapes() if on_gpu else SMOKE
    backend, interpret = ("gpu", False) if on_gpu else ("gpu", True)
    iters = args.iters if on_gpu else 1
    wanted = set(args.only.split(","))
    results: dict[str, dict] = {}
    copy_bw = None
    print(
        f"device: {describe_device()}  jax {jax.__version__}  "
        f"{'CPU SMOKE RUN (interpreters): timings are not performance figures' if not on_gpu else ''}"
    )
    if "copy" in wanted or "decode" in wanted:
        results["copy"] = bench_copy(shapes, iters)
        copy_bw = results["copy"]["copy_bandwidth_GBps"]
        print(f"copy bandwidth: {copy_bw:.1f} GB/s")
    if "decode" in wanted:
        r = results["decode"] = bench_decode(shapes, backend, interpret, iters, copy_bw)
        print(
            f"paged decode B={shapes.decode_batch} ctx={shapes.context} "
            f"{shapes.num_heads}/{shapes.num_kv_heads} "
            f"heads H={shapes.head_dim}: kernel {fmt_time(r['kernel'])} ({r['achieved_GBps']:.1f} GB/s, "
            f"{100 * r['share_of_copy_bw']:.1f}% of copy bw; goal >= 70%), xla {fmt_time(r['xla'])}"
        )
    if "flash" in wanted:
        r = results["flash"] = bench_flash(shapes, backend, interpret, iters, on_gpu)
        line = (
            f"flash prefill causal T={shapes.prefill_tokens} heads={shapes.prefill_heads} "
            f"H={shapes.head_dim}: "
            f"kernel {fmt_time(r['kernel'])} ({r['kernel_TFLOPs']:.1f} TFLOP/s)"
        )
        if "cudnn" in r:
            line += f", cudnn {fmt_time(r['cudnn'])}"
            if "ratio_vs_cudnn" in r:
                line += f" ({r['cudnn_TFLOPs']:.1f} TFLOP/s; kernel = {r['ratio_vs_cudnn']:.2f}x cuDNN, goal >= 0.8x)"
        line += f", xla {fmt_time(r['xla'])}"
        print(line)
    if "ragged" in wanted:
        r = results["ragged"] = bench_ragged(shapes, backend, interpret, iters)
        print(
            f"ragged mixed step ({shapes.chunks}x{shapes.chunk_len} prefill + {shapes.decode_tokens} decode, "
            f"ctx {shapes.context}): kernel {fmt_time(r['kernel'])}, xla {fmt_time(r['xla'])}"
            + (f" ({r['speedup_vs_xla']:.2f}x)" if "speedup_vs_xla" in r else "")
        )
    if "model" in wanted:
        r = results["model"] = bench_model(shapes, backend, interpret, iters)
        print(
            f"1B-shaped decode step (B={shapes.decode_batch}, ctx {shapes.context}): pallas "
            f"{fmt_time(r['pallas'])}, xla {fmt_time(r['xla'])}"
            + (f" ({r['speedup_vs_xla']:.2f}x)" if "speedup_vs_xla" in r else "")
        )

    if args.markdown:
        stamp = datetime.date.today().isoformat()
        lines = [
            f"\n## Kernel benchmark, {stamp}",
            "",
            f"- device: {describe_device()}; jax {jax.__version__}; command: "
            f"`python scripts/benchmark_kernels.py {' '.join(argv or sys.argv[1:])}`",
            "" if on_gpu else "- CPU smoke run: not performance figures",
            "",
        ]
        for name, r in results.items():
            cells = ", ".join(
                f"{k}={fmt_time(v) if k in ('kernel', 'xla', 'cudnn', 'pallas') else _num(v)}" for k, v in r.items()
            )
            lines.append(f"- {name}: {cells}")
        with open(args.markdown, "a") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"appended to {args.markdown}")
    return 0


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if not math.isnan(v) else "nan"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
