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


def test_no_acknowledged_event_is_lost(bench_work: Path, tmp_path: Path) -> None:
    print(_run("benchmarks.event_faults", "--items", "20000", "--work", str(bench_work),
               "--rate", "100", "--seconds", "6", "--results", str(tmp_path)))  # fmt: skip
    rows = json.loads((tmp_path / "event_faults.json").read_text())["rows"]
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


def test_a_rating_reaches_rank(bench_work: Path, tmp_path: Path) -> None:
    _run("benchmarks.freshness", "--items", "20000", "--work", str(bench_work),
         "--event-rate", "200", "--rank-rate", "10", "--seconds", "8", "--workers", "1",
         "--results", str(tmp_path))  # fmt: skip
    r = json.loads((tmp_path / "freshness.json").read_text())
    probes = [p for p in r["probes"] if "skipped" not in p and not p["control"]]
    assert len(probes) >= 8
    # without an event the item stays: the figure measures the event, nothing else
    assert r["controls"]["n"] >= 3 and r["controls"]["item_gone_without_an_event"] == 0
    # every probe's rated item left the user's answers (within 10 s: no timing here)
    assert all(p["ms"] is not None for p in probes), probes
    assert r["events"]["sent"] >= 1500 and r["rank_load"]["errors"] == {}
    assert (tmp_path / "freshness.png").stat().st_size > 10_000
