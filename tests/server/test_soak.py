"""The composition soak (``scripts/soak.py``), CI-sized: ~60 s of mixed traffic against one real server.

The server runs every serving feature at once (n-gram speculation, structured outputs, an int8 KV cache, prefix
caching, a pool small enough to preempt, async scheduling: ``soak.SERVER_FLAGS``) and gets good greedy requests
(checked against an in-process reference engine), cancels, disconnects, deadlines and bad requests from 8
workers. Asserted, as the script does: every completed output equals the reference (cut-short ones are a prefix
of it), every bad request is a 400 / INVALID_ARGUMENT, no engine step failed, no page is held once the load
stops, RSS stays bounded, health is SERVING throughout, nothing compiles while serving, every part of the
composition was exercised, and SIGTERM drains cleanly. The server compiles while the reference runs, so the
whole test takes ~2.5 minutes on a 2-core CPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import time
from types import ModuleType

from jserve import BUNDLED_MODEL
from jserve.tokenizer import Tokenizer
from tests.server.harness import REPO_ROOT, ServerProcess

LOAD_SECONDS = 30.0


def _load_soak() -> ModuleType:
    """scripts/ is not a package: the soak module is loaded from its file."""
    spec = importlib.util.spec_from_file_location("jserve_soak", REPO_ROOT / "scripts" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


def test_composition_soak():
    flags = soak.SERVER_FLAGS
    server = ServerProcess("--http-port", "0", *flags, precompile=True)  # nothing may compile while serving
    starting = threading.Thread(target=server.start, kwargs={"timeout": 300.0})
    started = time.monotonic()
    starting.start()  # the server loads and compiles while the reference engine runs here
    try:
        specs, references = soak.compute_references(
            soak.build_catalogue(Tokenizer.from_pretrained(BUNDLED_MODEL)),
            model=str(BUNDLED_MODEL),
            max_model_len=int(soak.flag(flags, "--max-model-len")),
            kv_cache_dtype=soak.flag(flags, "--kv-cache-dtype"),
            page_size=int(soak.flag(flags, "--page-size")),
        )
        print(f"references computed after {time.monotonic() - started:.0f} s")
        starting.join()
        assert server.http_port is not None and server.grpc_port is not None, server.log()
        print(f"server ready after {time.monotonic() - started:.0f} s")
        endpoints = soak.Endpoints(f"http://127.0.0.1:{server.http_port}", server.address, server.proc.pid)
        config = soak.SoakConfig(duration=LOAD_SECONDS, concurrency=8, seed=1)
        report = asyncio.run(soak.run_soak(config, endpoints, specs, references))
        text = soak.summary(report)
        print(text)
        failed = [f"{name}: {detail}" for name, passed, detail in report.checks if not passed]
        assert not failed, f"{text}\n{server.log()}"
    finally:
        starting.join()
        code = server.stop()
    assert code == 0, "the server did not drain cleanly on SIGTERM"
