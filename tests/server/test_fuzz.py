"""A schemathesis fuzz of the OpenAI HTTP server from its own /openapi.json: no 5xx, bounded memory, clean exit.

The server runs with small limits (max_model_len 64, 4 sequences) so that every accepted request is cheap; the
fuzzer's requests are bounded in count (60 per operation) and time. The server's resident memory is sampled
throughout from /proc (psutil) and must stay under a stated bound, and SIGTERM must still end it with 0.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil

from tests.server.harness import ServerProcess

EXAMPLES_PER_OPERATION = 60
MEMORY_GROWTH_BOUND = 512 << 20  # bytes of RSS over the idle server's, during and after the run


def _sample_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.2)


def test_schemathesis_finds_no_server_error_and_memory_stays_bounded(tmp_path):
    server = ServerProcess(
        "--http-port", "0", "--max-num-seqs", "4", "--max-model-len", "64", "--drain-timeout", "10"
    ).start()
    try:
        pid = server.proc.pid
        idle_rss = psutil.Process(pid).memory_info().rss
        stop, peak = threading.Event(), [idle_rss]
        sampler = threading.Thread(target=_sample_rss, args=(pid, stop, peak), daemon=True)
        sampler.start()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"http://127.0.0.1:{server.http_port}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                str(EXAMPLES_PER_OPERATION),
                "--phases",
                "examples,fuzzing",
                "--seed",
                "0",
                "--request-timeout",
                "30",
                "--generation-database",
                "none",
                "--workers",
                "2",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )
        time.sleep(1.0)  # and after the run
        stop.set()
        sampler.join()
        after_rss = psutil.Process(pid).memory_info().rss
        summary = result.stdout[-3000:]
        assert result.returncode == 0, summary
        assert "passed" in summary and "failed" not in summary.split("Test cases:")[-1], summary
        assert peak[0] - idle_rss < MEMORY_GROWTH_BOUND, (idle_rss, peak[0])
        assert after_rss - idle_rss < MEMORY_GROWTH_BOUND, (idle_rss, after_rss)
        start = time.monotonic()
        server.send_signal()
        assert server.wait(timeout=20) == 0, server.log()
        assert time.monotonic() - start < 10 + 5
    finally:
        server.kill()
