"""The committed kvpool.v1 stubs are exactly what `python proto/generate.py` produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_reproducible(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], check=True)
    for name in ("kvpool_pb2.py", "kvpool_pb2.pyi", "kvpool_pb2_grpc.py"):
        assert (tmp_path / name).read_bytes() == (ROOT / "proto" / name).read_bytes(), name


def test_the_service_has_every_rpc_of_the_protocol() -> None:
    from kvpool.proto import kvpool_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["KVPool"]
    assert pb.DESCRIPTOR.package == "kvpool.v1"
    assert {m.name for m in service.methods} == {
        "Lookup", "Put", "Get", "Delete", "Stats", "Topology", "OpenShared", "GetShared",
        "PutShared", "CloseShared", "BatchGet", "BatchPut", "PutArtifact", "GetArtifact",
        "PutRecord", "GetRecord", "Touch",
    }  # fmt: skip
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streaming["Put"] == (True, False) and streaming["Get"] == (False, True)
    assert streaming["BatchPut"] == (True, False) and streaming["BatchGet"] == (False, True)
