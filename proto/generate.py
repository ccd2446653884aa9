"""Regenerate the kvpool.v1 Python stubs (messages, gRPC service, .pyi types).

    python proto/generate.py

The outputs (`kvpool_pb2.py`, `kvpool_pb2.pyi`, `kvpool_pb2_grpc.py`) are committed; the
stubs are byte-identical for a given grpcio-tools version, which pyproject.toml pins.
The proto is compiled as `kvpool/proto/kvpool.proto` so that the generated gRPC module
imports its messages as `kvpool.proto.kvpool_pb2`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
OUTPUTS = ("kvpool_pb2.py", "kvpool_pb2.pyi", "kvpool_pb2_grpc.py")


def generate(out_dir: Path = HERE) -> None:
    """Compile proto/kvpool.proto into `out_dir`."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-Ikvpool/proto={HERE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            "kvpool/proto/kvpool.proto",
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for name in OUTPUTS:
            shutil.copyfile(Path(tmp, "kvpool", "proto", name), out_dir / name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
