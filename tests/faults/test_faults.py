"""The fault-injection suite at CI size: a 20k-item set on Redis, every part a
real process on loopback, a steady open-loop load while each fault is injected
and cleared (benchmarks/faults.py). It asserts what must hold on any machine:
no request fails, answers during a fault say they are degraded, and full quality
returns before the run ends. How fast is the benchmark's business."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

FAULTS = ("redis_kill", "candidate_stop", "candidate_slow", "artifact_swap", "overload",
          "shard_kill", "cluster_master_kill")  # fmt: skip
"""Every fault the benchmark injects by default, in its order."""

POST_S = 6.0


def test_every_fault_degrades_never_fails_and_recovers(bench_work: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "benchmarks.faults", "--items", "20000", "--work", str(bench_work),
        "--results", str(results), "--rate", "8", "--max-rate", "12", "--pre-s", "2",
        "--fault-s", "3", "--post-s", str(POST_S), "--warmup", "1", "--reload-s", "0.5",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)
    r = json.loads((results / "faults.json").read_text())
    assert r["items"] == 20000 and list(r["faults"]) == list(FAULTS)
    for name, row in r["faults"].items():
        assert row["sent"] > 0 and row["sent"] == row["ok"] + row["shed"] + row["failed"], name
        assert row["failed"] == 0, (name, row["failed_codes"])
        assert row["ok"] > 0 and 0 < row["ok_p50_ms"] <= row["ok_p99_ms"], name
        assert row["recovery_s"] is not None and 0.0 <= row["recovery_s"] < POST_S, (name, row)
    for name in ("redis_kill", "candidate_stop", "candidate_slow"):
        row = r["faults"][name]
        assert row["by_fault_during"] > 0 and row["degraded_during_fault"] > 0, (name, row)
    # the rungs of a missing dependency (a busy machine adds fewer_candidates)
    assert r["faults"]["redis_kill"]["rungs"].keys() & {"cached_user_features", "popular_items"}
    for name in ("candidate_stop", "candidate_slow"):
        assert r["faults"][name]["rungs"].keys() & {"cached_response", "popular_items"}, name
    swap = r["faults"]["artifact_swap"]
    assert swap["answers_of_new_version"] > 0 and swap["versions"]["new"].startswith("faults_")
    assert r["faults"]["overload"]["offered_rps"] == 36.0
    # a shard killed: the other shard's candidates, said so, never a failure; full
    # answers within 5 s of its return
    shard = r["faults"]["shard_kill"]
    assert shard["partial_during_fault"] > 0 and shard["rungs"]["partial_candidates"] > 0
    assert shard["recovery_s"] < 5.0, shard
    # a Redis Cluster master killed: its replica takes over; the reads of its slots
    # fail until then and the ladder answers (never a failed request)
    master = r["faults"]["cluster_master_kill"]
    assert master["by_fault_during"] > 0, master
    assert master["rungs"].keys() & {"cached_user_features", "cached_response", "popular_items"}
    assert master["roles_after"][0] == "slave" and master["roles_after"].count("master") == 3
    assert (results / "faults.png").stat().st_size > 10_000
