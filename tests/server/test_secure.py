"""TLS (--tls-cert/--tls-key) and API keys (--api-key) on gRPC and HTTP, against one server process."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jserve.server.gen import jserve_pb2 as pb
from jserve.server.gen import jserve_pb2_grpc as pb_grpc
from tests.server.harness import ServerProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A throw-away self-signed certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout",
        str(d / "key.pem"),
        "-out",
        str(d / "cert.pem"),
    ]
    subprocess.run(command, check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def server(cert):
    proc = ServerProcess(
        "--tls-cert", str(cert[0]), "--tls-key", str(cert[1]), "--api-key", API_KEY, "--http-port", "0"
    ).start()
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def channel(server, cert):
    credentials = grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes())
    with grpc.secure_channel(server.address, credentials) as ch:
        yield ch


def _generate(channel, metadata=None) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=2))
    return list(pb_grpc.GenerationStub(channel).Generate(request, metadata=metadata, timeout=60))


@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer wrong")], [("x-api-key", "nope")]])
def test_missing_or_wrong_key_is_unauthenticated(channel, metadata):
    with pytest.raises(grpc.RpcError) as info:
        _generate(channel, metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("metadata", [[("authorization", f"Bearer {API_KEY}")], [("x-api-key", API_KEY)]])
def test_right_key_over_tls_generates(channel, metadata):
    assert _generate(channel, metadata)[-1].finished


def test_health_needs_no_key(channel):
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_is_refused(server):
    with grpc.insecure_channel(server.address) as ch, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GenerationStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_https_api_key(server, cert):
    context = ssl.create_default_context(cafile=str(cert[0]))
    url = f"https://127.0.0.1:{server.http_port}/v1/models"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, context=context, timeout=10)
    assert info.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    body = json.loads(urllib.request.urlopen(request, context=context, timeout=10).read())
    assert body["data"][0]["id"] == "tiny-pycoder"
