"""The Locust file against the real ranker on loopback: Locust runs it headless
for a few seconds and its CSV shows the calls, the degraded ones apart, no
failures. Nothing about speed is asserted."""

from __future__ import annotations

import asyncio
import csv
import sys
from pathlib import Path

import pandas as pd

from sieve import artifacts
from tests.conftest import ROOT

UNKNOWN_USER = 10**9  # no features: answered with popular items, a rung


async def test_locustfile_drives_rank(
    servers: dict[str, object], artifact_set: artifacts.ArtifactSet, tmp_path: Path
) -> None:
    users = pd.read_parquet(artifact_set.verified("user_features"), columns=["user_id"])
    ids = [*users["user_id"].head(20).tolist(), UNKNOWN_USER]
    (tmp_path / "users.txt").write_text("\n".join(map(str, ids)) + "\n")
    locust = Path(sys.executable).parent / "locust"
    proc = await asyncio.create_subprocess_exec(
        str(locust), "-f", str(ROOT / "benchmarks" / "locustfile.py"),
        "--host", str(servers["ranker"]), "--sieve-users-file", str(tmp_path / "users.txt"),
        "--sieve-wait", "0.02", "--headless", "-u", "4", "-r", "4", "-t", "4s",
        "--csv", str(tmp_path / "out"), "--only-summary",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    log = out.decode(errors="replace")
    assert proc.returncode == 0, log[-3000:]
    with open(tmp_path / "out_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    rank = rows["Rank"]
    assert int(rank["Request Count"]) >= 20, log[-3000:]
    assert int(rank["Failure Count"]) == 0, (tmp_path / "out_failures.csv").read_text()
    degraded = [n for n in rows if n.startswith("Rank [degraded: ")]
    assert degraded, sorted(rows)
    assert all("popular_items" in n for n in degraded), degraded
    assert 0 < sum(int(rows[n]["Request Count"]) for n in degraded) < int(rank["Request Count"])
