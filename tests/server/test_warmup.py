"""Default launch (with warm-up): progress is shown and serving starts only afterwards."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.harness import ServerProcess


@pytest.mark.slow
def test_warmup_shows_progress_then_serves():
    server = ServerProcess(warmup=True).start(timeout=600)
    try:
        log = server.log()
        assert "jserve: warm-up" in log and "warm-up done" in log
        with grpc.insecure_channel(server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert server.stop() == 0
