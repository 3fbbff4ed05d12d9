"""The feedback loop's fault rows and its freshness probe at CI size (20k items,
every part a real process: the stream's Redis with AOF, two ``sieve events``
workers, candidate and ranker). What must hold on any machine: no acknowledged
event is lost through a worker SIGKILL, a Redis SIGKILL and restart, or poison
among the good; a rating becomes visible to Rank. How fast is the benchmarks'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _run(module: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_no_acknowledged_event_is_lost_and_a_rating_reaches_rank(
    bench_work: Path, tmp_path: Path
) -> None:
    print(_run("benchmarks.event_faults", "--items", "20000", "--work", str(bench_work),
               "--rate", "100", "--seconds", "6", "--probe-s", "8", "--probe-rate", "200",
               "--results", str(tmp_path)))  # fmt: skip
    r = json.loads((tmp_path / "event_faults.json").read_text())
    rows = r["rows"]
    assert list(rows) == ["worker_kill", "stream_kill", "poison"]
    for name, row in rows.items():
        assert row["sent"] > 300, name
        # the client retries what is not acknowledged, so everything is, in the end
        assert row["acknowledged"] == row["sent"], (name, row)
        assert row["applied"] == row["visible"] == row["acknowledged"], (name, row)
        assert row["lost"] == 0, (name, row)
    assert rows["stream_kill"]["not_acknowledged_retries"] > 0  # the fault was hit
    # the worker was killed holding entries it had read and not acknowledged
    assert rows["worker_kill"]["entries_held_at_kill"] > 0
    assert rows["poison"]["dead_letters"] == 10
    assert rows["worker_kill"]["dead_letters"] == rows["stream_kill"]["dead_letters"] == 0
    # freshness probes: every rated item left the user's full-quality answers (no
    # timing here), and without an event the item stays
    f = r["freshness"]
    probes = [p for p in f["probes"] if "skipped" not in p and not p["control"]]
    assert len(probes) >= 8 and all(p["ms"] is not None for p in probes), probes
    assert f["controls"]["n"] >= 3 and f["controls"]["item_gone_without_an_event"] == 0
    assert f["events"]["sent"] >= 1500
