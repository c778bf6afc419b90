"""The committed stubs in jserve/server/gen/ must be what protos/ generates (run jserve.server.protogen)."""

from __future__ import annotations

import pytest

from jserve.server import protogen


def test_generated_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    fresh = {p.name: p.read_text() for p in protogen.generate(tmp_path)}
    paths = {name: protogen.GEN_DIR / name for name in fresh}
    committed = {name: path.read_text() for name, path in paths.items() if path.exists()}
    stale = sorted(name for name in fresh if committed.get(name) != fresh[name])
    assert not stale, f"stale {stale}: run `python -m jserve.server.protogen`, commit jserve/server/gen/"


def test_jetstream_wire_numbers():
    """The JetStream messages keep JetStream's field numbers (docs/api.md), whatever else changes."""
    from jserve.server.gen import jetstream_pb2

    req = jetstream_pb2.DecodeRequest.DESCRIPTOR.fields_by_name
    assert {n: req[n].number for n in req} == {
        "max_tokens": 4,
        "text_content": 5,
        "token_content": 6,
        "metadata": 7,
        "num_samples": 8,
        "lora_adapter_id": 9,
        "has_bos": 10,
    }
    resp = jetstream_pb2.DecodeResponse.DESCRIPTOR.fields_by_name
    assert {n: resp[n].number for n in resp} == {"initial_content": 2, "stream_content": 3}
    sample = jetstream_pb2.DecodeResponse.StreamContent.Sample.DESCRIPTOR.fields_by_name
    assert (sample["text"].number, sample["token_ids"].number) == (1, 2)
    assert jetstream_pb2.HealthCheckResponse.DESCRIPTOR.fields_by_name["is_live"].number == 1
    assert jetstream_pb2.DESCRIPTOR.package == "jetstream_proto"
    assert [m.name for m in jetstream_pb2.DESCRIPTOR.services_by_name["Orchestrator"].methods] == [
        "Decode",
        "HealthCheck",
    ]
