"""A real ``python -m jserve.launch`` process on 127.0.0.1 for the server tests.

Ports are chosen by the server (``--port 0``) and read back from the ``jserve: listening on`` lines it prints,
so parallel test workers never race for a port. The child shares the test run's persistent JAX compilation
cache (see tests/conftest.py), so each step shape compiles once per run, not once per server.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from jserve.server.gen import jserve_pb2, jserve_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTEN = re.compile(r"jserve: listening on (?:https?://)?([\d.]+):(\d+)(/v1|/metrics)?")


class ServerProcess:
    """Starts the server, waits for ``jserve: ready``, and knows its gRPC / HTTP / metrics ports."""

    def __init__(self, *args: str, precompile: bool | str = False, env: dict[str, str] | None = None):
        """``precompile=False`` (most tests): programs compile on first use, as tests only need the ones they
        run; the tests of what a ready server guarantees pass True (every program built before ready) or
        "background"."""
        mode = (
            ["--no-precompile"]
            if precompile is False
            else ["--precompile", "all" if precompile is True else precompile]
        )
        self.args = ["--port", "0", *mode, *args]
        self.env = env or {}
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()
        self._stderr = tempfile.NamedTemporaryFile("w+", prefix="jserve-server-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 180.0) -> ServerProcess:
        self.launch()
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        """Waits for ``jserve: ready``; kills the process and raises (with its log) if it does not come."""
        if not self._ready.wait(timeout) or self.grpc_port is None:
            self.kill()
            raise RuntimeError(f"server did not become ready in {timeout}s:\n{self.log()}")
        return self

    def launch(self) -> ServerProcess:
        """Starts the process without waiting for it to be ready (``wait_ready`` waits)."""
        cache = os.environ.get("JSERVE_TEST_JAX_CACHE", str(REPO_ROOT / ".jax_cache"))
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": os.path.abspath(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
            "JAX_DEFAULT_MATMUL_PRECISION": "highest",
            "TOKENIZERS_PARALLELISM": "false",
            **self.env,
        }
        env.pop("JSERVE_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jserve.launch", *self.args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            if m := _LISTEN.search(line):
                port = int(m.group(2))
                if m.group(3) == "/v1":
                    self.http_port = port
                elif m.group(3) == "/metrics":
                    self.metrics_port = port
                else:
                    self.grpc_port = port
            if line.startswith("jserve: ready"):
                self._ready.set()
        self._ready.set()  # the process ended: wake a waiting start()

    def log(self) -> str:
        self._stderr.flush()
        return "".join(self.stdout_lines) + Path(self._stderr.name).read_text()[-4000:]

    def channel(self, **options) -> grpc.Channel:
        return grpc.insecure_channel(self.address, **options)

    def model_info(self) -> jserve_pb2.ModelInfo:
        with self.channel() as ch:
            stub = jserve_pb2_grpc.GenerationStub(ch)
            return stub.GetModelInfo(jserve_pb2.GetModelInfoRequest(), timeout=10)

    def wait_pages_free(self, expected: int, timeout: float = 10.0) -> jserve_pb2.ModelInfo:
        """Polls GetModelInfo until pages_free == expected and nothing runs; returns the last info."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.model_info()
            if (
                info.pages_free == expected and info.num_running == 0 and info.num_waiting == 0
            ) or time.monotonic() > deadline:
                return info
            time.sleep(0.05)

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; kills it if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self._stderr.close()
            os.unlink(self._stderr.name)


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A /metrics page as {sample name: [(labels, value), ...]}, parsed by prometheus_client."""
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric_value(samples: dict, name: str, **labels: str) -> float:
    """The one value of ``name`` whose labels include ``labels``; KeyError names what is missing."""
    values = [v for have, v in samples.get(name, []) if labels.items() <= have.items()]
    if len(values) != 1:
        raise KeyError(f"{name}{labels}: {len(values)} samples in {samples.get(name)}")
    return values[0]
