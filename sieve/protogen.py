"""Generate the Python code and type stubs for ``protos/sieve/v1/sieve.proto``.

The generated files are checked in; ``tests/unit/test_protos.py`` regenerates them
into a temporary folder and fails when the checked-in copies are stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos/sieve/v1/sieve.proto")
GENERATED = ("sieve_pb2.py", "sieve_pb2.pyi", "sieve_pb2_grpc.py", "sieve_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (with the mypy-protobuf plugins) into ``out_dir``.

    Returns:
        The generated files, under ``out_dir/protos/sieve/v1/``.
    """
    bin_dir = Path(sys.executable).parent  # the plugins live beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_dir / PROTO.parent / name for name in GENERATED]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            target = ROOT / PROTO.parent / path.name
            target.write_bytes(path.read_bytes())
            print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
