from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import SieveConfig, load_config
from sieve import artifacts
from sieve.atomic import atomic_path
from sieve.errors import ArtifactError
from sieve.manifest import FeatureSchemaSection, IndexSection, Manifest, ModelSection


def test_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "sieve.toml"
    path.write_text("[ranker]\nmax_per_genr = 3\n")
    with pytest.raises(ValidationError, match="max_per_genr"):
        load_config(path)


def test_out_of_range_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sieve.toml"
    path.write_text("[candidate]\nmax_k = 4096\n")
    with pytest.raises(ValidationError, match="max_k"):
        load_config(path)


def test_grpcs_bound_on_held_calls_defaults_to_one_above_rank_and_never_below(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sieve.toml"
    path.write_text("[ranker.reliability]\nmax_in_flight = 4\n")
    assert load_config(path).ranker.reliability.accepted_bound == 5
    path.write_text("[ranker.reliability]\nmax_in_flight = 4\nmax_accepted = 9\n")
    assert load_config(path).ranker.reliability.accepted_bound == 9
    path.write_text("[ranker.reliability]\nmax_in_flight = 4\nmax_accepted = 4\n")
    with pytest.raises(ValidationError, match=r"max_accepted \(4\) must be above max_in_flight"):
        load_config(path)


def test_rank_cpu_work_runs_on_the_loop_by_default_and_a_thread_when_asked(
    tmp_path: Path,
) -> None:
    assert load_config(None).ranker.reliability.cpu_threads == 0
    path = tmp_path / "sieve.toml"
    path.write_text("[ranker.reliability]\ncpu_threads = 1\n")
    assert load_config(path).ranker.reliability.cpu_threads == 1
    path.write_text("[ranker.reliability]\ncpu_threads = -1\n")
    with pytest.raises(ValidationError, match="cpu_threads"):
        load_config(path)


def test_config_is_frozen_and_defaults_load() -> None:
    cfg = load_config(None)
    assert cfg == SieveConfig()
    with pytest.raises(ValidationError):
        cfg.ranker.default_k = 3  # type: ignore[misc]


def test_redis_store_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "sieve.toml"
    path.write_text('[build.online_store]\ntype = "redis"\nconnection_string = "127.0.0.1:7000"\n')
    assert load_config(path).build.online_store.type == "redis"


def test_atomic_path_leaves_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def _set(tmp_path: Path) -> Path:
    v = tmp_path / "versions" / "v1"
    v.mkdir(parents=True)
    (v / "index.faiss").write_bytes(b"abc")
    artifacts.write_manifest(
        v,
        Manifest(
            version="v1",
            index=IndexSection(factory="Flat", dim=4, ntotal=0),
            model=ModelSection(input_name="rows", output_name="score", features=("a",)),
            feature_schema=FeatureSchemaSection(project="p", feature_service="s"),
            files={"index": artifacts.file_entry(v, "index.faiss")},
        ),
    )
    artifacts.publish(tmp_path, "v1")
    return v


def test_manifest_round_trip_and_checksum(tmp_path: Path) -> None:
    v = _set(tmp_path)
    aset = artifacts.load(tmp_path)
    assert aset.version == "v1" and aset.verified("index") == v / "index.faiss"
    (v / "index.faiss").write_bytes(b"abd")
    with pytest.raises(ArtifactError, match=r"index file .*index.faiss does not match"):
        aset.verified("index")
    (v / "index.faiss").unlink()
    with pytest.raises(ArtifactError, match=r"index file .*index.faiss is missing"):
        aset.verified("index")


def test_missing_or_bad_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="CURRENT is missing"):
        artifacts.load(tmp_path)
    v = _set(tmp_path)
    (v / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is not readable JSON"):
        artifacts.load(tmp_path)
    (v / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ArtifactError, match="not a sieve manifest"):
        artifacts.load(tmp_path)
