"""The generated protocol code must be what `make proto` produces from the .proto today."""

import subprocess
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(PROTO_ROOT / "textgen/proto/generate.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "textgen/proto" / name).read_text()
        committed = (PROTO_ROOT / "textgen/proto" / name).read_text()
        assert committed == fresh, f"{name} is stale: run `make proto`"


def test_protocol_has_the_design_rpcs():
    from textgen.proto import generate_pb2

    service = generate_pb2.DESCRIPTOR.services_by_name["TextGenerationService"]
    assert set(service.methods_by_name) == {
        "Info",
        "Health",
        "ServiceDiscovery",
        "Warmup",
        "Prefill",
        "Decode",
        "FilterBatch",
        "ClearCache",
    }
