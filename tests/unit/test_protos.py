"""The checked-in generated code must be what protoc makes of the .proto today."""

from pathlib import Path

from sieve.protogen import GENERATED, PROTO, ROOT, generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in generate(tmp_path)}
    assert sorted(fresh) == sorted(GENERATED)
    stale = [n for n in GENERATED if (ROOT / PROTO.parent / n).read_bytes() != fresh[n]]
    assert not stale, f"{stale} are stale: run `make protos` and commit the result"
