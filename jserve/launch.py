"""``python -m jserve.launch``: flags -> EngineArgs -> engine (first programs built) -> gRPC (+ HTTP) -> drain.

Lifecycle: the model is loaded and the first step programs built (behind a progress bar: the smallest decode
program and one prefill program, loaded from the executable cache or compiled) before the port opens; the rest
are built in a background thread and used once built (``--precompile all`` builds every one first). No
request ever waits on a compile: steps use only programs that exist. The listening addresses are printed
(stdout, one ``jserve: listening on`` line per endpoint, then ``jserve: ready``) only once serving. SIGTERM
or SIGINT turns health NOT_SERVING, refuses new calls with UNAVAILABLE, lets in-flight calls finish for up
to ``--drain-timeout`` seconds (a second signal cuts the wait short), cancels what is left (which aborts those
requests), and exits. Whatever the engine thread is doing, the process is gone ``--drain-timeout`` + 5 s after
the first signal.

Liveness: if one engine step (or admission) runs longer than ``--engine-stall-timeout``, health turns
NOT_SERVING and new calls get UNAVAILABLE until it returns, so a load balancer drains the replica.

Exit codes: 0 after a complete drain; 3 when the drain was cut short (timeout, a second signal, or an
engine thread that would not stop); 2 for bad flags, including options whose capability has not landed yet
(EngineArgs says which); 1 if loading fails otherwise.

Multi-host (``--num-processes N --coordinator-address HOST:PORT --process-id I``): every process loads its
part of the model; process 0 serves and broadcasts each step's inbox, the others step in lockstep
(jserve.parallel.multihost) and exit 0 when process 0 stops.

Test hooks: the hidden flag ``--debug-fail-after-steps N`` makes every engine step after the first N (counted
from the end of loading) raise, so tests can check that an engine failure gives INTERNAL and NOT_SERVING;
``--debug-step-delay S`` makes every step sleep S seconds first (a stuck engine, for the liveness tests).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from jserve.engine_args import BACKGROUND, add_engine_flags, engine_args_from_flags
from jserve.quant.config import kv_value_dtype
from jserve.server.tool_calls import TOOL_PARSERS

EXIT_DRAIN_CUT_SHORT = 3
EXIT_GRACE_SECONDS = 5.0  # after --drain-timeout, for closing the listeners


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jserve.launch",
        description="Serve a model over gRPC (jserve.v1, JetStream) and optionally OpenAI-compatible HTTP.",
    )
    p.add_argument(
        "--served-model-name", default=None, help="name reported to clients (default: the model directory's name)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000, help="gRPC port (0 picks a free one)")
    p.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP port (off by default)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port (off by default)")
    add_engine_flags(p)  # one flag per EngineArgs field (jserve/engine_args.py)
    p.set_defaults(precompile=BACKGROUND)  # a server is ready in seconds; LLM() builds everything first
    serving = p.add_argument_group("serving")
    serving.add_argument(
        "--max-queue-size",
        type=int,
        default=1024,
        help="requests in flight (running + waiting) before RESOURCE_EXHAUSTED",
    )
    serving.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to let in-flight calls finish after SIGTERM/SIGINT"
    )
    serving.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=60.0,
        help="seconds one engine step (or admission) may take before health turns NOT_SERVING",
    )
    serving.add_argument(
        "--max-message-bytes", type=int, default=16 << 20, help="gRPC message and HTTP body size limit"
    )
    serving.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(TOOL_PARSERS),
        help="chat tool_choice 'auto': how to read tool calls in the model's output (hermes: <tool_call> tags; "
        "llama3_json: a JSON object); without it 'auto' is refused",
    )
    serving.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    serving.add_argument("--tls-key", default=None, help="PEM private key")
    serving.add_argument(
        "--api-key",
        default=os.environ.get("JSERVE_API_KEY"),
        help="require this key (gRPC 'authorization: Bearer KEY' metadata, HTTP "
        "Authorization header); default: $JSERVE_API_KEY",
    )
    serving.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="PEFT adapters to serve from the start, each selected by its NAME in the OpenAI 'model' field, "
        "gRPC lora_name or JetStream lora_adapter_id (needs --enable-lora)",
    )
    multi = p.add_argument_group("multi-host")
    multi.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=int, default=1)
    multi.add_argument("--process-id", type=int, default=0)
    p.add_argument("--debug-fail-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-step-delay", type=float, default=None, help=argparse.SUPPRESS)
    return p


def _fail(message: str) -> int:
    print(f"jserve: error: {message}", file=sys.stderr, flush=True)
    return 2


def _check_serving_flags(ns: argparse.Namespace) -> None:
    if ns.num_processes < 1 or not 0 <= ns.process_id < ns.num_processes:
        raise ValueError("--process-id must be in [0, --num-processes)")
    if ns.num_processes > 1 and not ns.coordinator_address:
        raise ValueError("--num-processes > 1 needs --coordinator-address HOST:PORT (process 0's)")
    if ns.max_queue_size < 1:
        raise ValueError("--max-queue-size must be >= 1")
    if ns.drain_timeout < 0:
        raise ValueError("--drain-timeout must be >= 0")
    if ns.engine_stall_timeout <= 0:
        raise ValueError("--engine-stall-timeout must be > 0")
    if bool(ns.tls_cert) != bool(ns.tls_key):
        raise ValueError("pass both --tls-cert and --tls-key, or neither")
    for path in (ns.tls_cert, ns.tls_key):
        if path and not Path(path).is_file():
            raise ValueError(f"TLS file {path!r} does not exist")
    if ns.lora_modules and not ns.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    _lora_modules(ns)


def _inject_step_failure(engine, after_steps: int) -> None:
    """Test hook (see the module docstring): steps after the first ``after_steps`` raise."""
    step, count = engine.step, itertools.count(1)

    def failing_step():
        if next(count) > after_steps:
            raise RuntimeError(f"injected engine-step failure (--debug-fail-after-steps {after_steps})")
        return step()

    engine.step = failing_step


def _inject_step_delay(engine, seconds: float) -> None:
    """Test hook (see the module docstring): every step first sleeps ``seconds`` (a stuck engine)."""
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        _check_serving_flags(ns)
        args = engine_args_from_flags(ns)
    except ValueError as e:
        return _fail(str(e))

    multihost = None
    if ns.num_processes > 1:
        from jserve.parallel import multihost

        try:
            multihost.initialize(ns.coordinator_address, ns.num_processes, ns.process_id)
        except ValueError as e:
            return _fail(str(e))
    print(f"jserve: loading {args.model}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    from jserve.engine.factory import build_engine

    try:
        engine = build_engine(args)
    except ValueError as e:
        return _fail(str(e))
    stats, took = engine.stats(), time.perf_counter() - start
    if stats["num_programs"] < stats["num_programs_total"]:
        built = f"{stats['num_programs']} of {stats['num_programs_total']} programs built, the rest building"
        print(f"jserve: loaded in {took:.1f}s; {built} in the background", file=sys.stderr, flush=True)
    else:
        print(f"jserve: loaded and compiled in {took:.1f}s", file=sys.stderr, flush=True)
    if multihost is not None:
        engine.inbox_sync = multihost.broadcast_items
        if not multihost.is_leader():  # followers serve nothing: they replay process 0's steps until it stops
            print(f"jserve: process {ns.process_id} follows process 0", file=sys.stderr, flush=True)
            multihost.follow(engine)
            print("jserve: stopped", file=sys.stderr, flush=True)
            return 0
    try:
        adapters = _load_adapters(engine, ns, ns.served_model_name or Path(args.model).name)
    except ValueError as e:
        return _fail(str(e))
    if ns.debug_fail_after_steps is not None:
        _inject_step_failure(engine, ns.debug_fail_after_steps)
    if ns.debug_step_delay is not None:
        _inject_step_delay(engine, ns.debug_step_delay)
    code, engine_stopped = asyncio.run(serve(engine, ns, args, adapters))
    if not engine_stopped:  # the engine thread is stuck inside a step: nothing would end it but the exit
        print("jserve: engine thread did not stop; exiting without waiting for it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code or EXIT_DRAIN_CUT_SHORT)
    if multihost is not None:
        multihost.stop_followers(engine)  # after serve(): the engine thread has stopped stepping
    return code


def _exit_deadline(seconds: float) -> threading.Timer:
    """After the first signal: whatever the engine or the loop are doing, the process ends by then."""

    def hard_exit() -> None:
        print(f"jserve: still running {seconds:g}s after the signal; exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_DRAIN_CUT_SHORT)

    timer = threading.Timer(seconds, hard_exit)
    timer.daemon = True
    timer.start()
    return timer


def _load_adapters(engine, ns: argparse.Namespace, base_name: str):
    """The served adapters (``--enable-lora``), with ``--lora-modules`` loaded; None without LoRA."""
    if not ns.enable_lora:
        return None
    from jserve.lora.registry import AdapterRegistry

    adapters = AdapterRegistry(engine, base_name)
    for name, path in _lora_modules(ns):
        adapters.load(name, path)
    return adapters


def _lora_modules(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """``--lora-modules`` as (name, path) pairs; ValueError for one that is not NAME=PATH."""
    pairs = []
    for module in ns.lora_modules:
        name, _, path = module.partition("=")
        if not name or not path:
            raise ValueError(f"--lora-modules: expected NAME=PATH, got {module!r}")
        pairs.append((name, path))
    return pairs


async def serve(engine, ns: argparse.Namespace, args, adapters=None) -> tuple[int, bool]:
    """Serves until a signal, then drains; returns the exit code and whether the engine thread stopped."""
    from jserve.engine.async_llm import AsyncLLM
    from jserve.metrics import ServerMetrics
    from jserve.server.core import ServingCore

    card = _model_card(engine, args, ns.served_model_name or Path(args.model).name)
    llm = AsyncLLM(engine, max_queue_size=ns.max_queue_size)
    metrics = ServerMetrics(engine.stats, model_name=card.name)
    core = ServingCore(llm, card, metrics, stall_timeout=ns.engine_stall_timeout, adapters=adapters)
    try:
        server, health, port, http, metrics_port = _listeners(core, metrics, ns)
    except (OSError, RuntimeError, ValueError) as e:
        llm.shutdown()
        return _fail(f"cannot listen: {e}"), True
    await server.start()
    if http is not None:
        http.start()
    await health.set_serving(True)
    scheme = "https" if ns.tls_cert else "http"
    print(f"jserve: listening on {ns.host}:{port} (gRPC{', TLS' if ns.tls_cert else ''})", flush=True)
    if http is not None:
        print(f"jserve: listening on {scheme}://{ns.host}:{http.port}/v1 (OpenAI HTTP)", flush=True)
    if metrics_port is not None:
        print(f"jserve: listening on http://{ns.host}:{metrics_port}/metrics (Prometheus)", flush=True)
    print(f"jserve: ready, serving {card.name}", flush=True)

    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            _exit_deadline(ns.drain_timeout + EXIT_GRACE_SECONDS)
        (force if stop.is_set() else stop).set()
        print(f"jserve: got {signal.Signals(signum).name}", file=sys.stderr, flush=True)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    watchdog = loop.create_task(_watch_engine(core, health))
    await stop.wait()
    code = await _drain(core, health, ns.drain_timeout, force)
    watchdog.cancel()
    if http is not None:
        await http.stop()
    await server.stop(grace=None)
    llm.shutdown(timeout=1.0)
    print("jserve: stopped", file=sys.stderr, flush=True)
    return code, not llm.thread_alive


def _listeners(core, metrics, ns: argparse.Namespace) -> tuple:
    """The gRPC server (with its health service and port), the HTTP server (or None) and the metrics port (or
    None), bound but not started."""
    from jserve.server.grpc_server import GrpcOptions, build_grpc_server
    from jserve.server.http_server import HttpServer

    options = GrpcOptions(
        host=ns.host,
        port=ns.port,
        max_message_bytes=ns.max_message_bytes,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        api_key=ns.api_key,
    )
    server, health, port = build_grpc_server(core, options)
    http = None
    if ns.http_port is not None:
        http = HttpServer(
            core,
            ns.host,
            ns.http_port,
            api_key=ns.api_key,
            tls_cert=ns.tls_cert,
            tls_key=ns.tls_key,
            max_body_bytes=ns.max_message_bytes,
            tool_call_parser=ns.tool_call_parser,
        )
    metrics_port = metrics.serve(ns.host, ns.metrics_port) if ns.metrics_port is not None else None
    return server, health, port, http, metrics_port


async def _drain(core, health, drain_timeout: float, force: asyncio.Event) -> int:
    """Stops taking calls and waits for those in flight, up to ``drain_timeout`` or a second signal; the exit
    code (EXIT_DRAIN_CUT_SHORT when calls had to be cancelled)."""
    print(
        f"jserve: draining {core.num_in_flight} in-flight calls (up to {drain_timeout:g}s)",
        file=sys.stderr,
        flush=True,
    )
    core.start_draining()
    await health.shutting_down()
    loop = asyncio.get_running_loop()
    idle, forced = loop.create_task(core.wait_idle(drain_timeout)), loop.create_task(force.wait())
    await asyncio.wait({idle, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if idle.done() and idle.result():
        return 0
    idle.cancel()
    print(f"jserve: drain cut short; cancelling {core.num_in_flight} calls", file=sys.stderr, flush=True)
    return EXIT_DRAIN_CUT_SHORT


def _model_card(engine, args, name: str):
    import jax

    from jserve.checkpoint import resolve_dtype
    from jserve.config import ModelConfig
    from jserve.server.core import ModelCard

    devices = jax.devices()
    dtype = resolve_dtype(args.dtype, ModelConfig.from_pretrained(Path(args.model)))
    runner = getattr(engine, "replicas", [engine])[0].runner
    quant = runner.config.weight_quant
    return ModelCard(
        name=name,
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
        page_size=args.page_size,
        max_num_seqs=args.max_num_seqs,
        dtype=str(jax.numpy.dtype(dtype)),
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        num_devices=len(devices),
        platform=devices[0].platform,
        quantization=quant.describe() if quant is not None else "",
        kv_cache_dtype=str(kv_value_dtype(runner.kv_dtype)),
    )


async def _watch_engine(core, health) -> None:
    """Keeps health in step with the engine even when no call is there to notice: NOT_SERVING for good when
    the engine dies, NOT_SERVING while one step has run past the stall timeout (SERVING again after it)."""
    stalled = False
    while not core.engine_dead:
        if core.engine_stalled != stalled:
            stalled = not stalled
            state = "NOT_SERVING" if stalled else "SERVING"
            print(f"jserve: engine step {'stalled' if stalled else 'recovered'}; health is {state}", file=sys.stderr)
            if not core.draining:
                await health.set_serving(not stalled)
        await asyncio.sleep(0.2)
    print(f"jserve: engine failed: {core.llm.errored!r}; health is NOT_SERVING", file=sys.stderr, flush=True)
    await health.set_serving(False)


if __name__ == "__main__":
    sys.exit(main())
