"""The latency benchmark's harness end to end at CI size: a 20k-item synthetic set
on Redis, both services and the naive pipeline as processes, a few seconds of
open-loop load. It checks that the numbers are there and well-formed, never how
fast they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ranker.config import StageBudgetMs
from tests.conftest import ROOT

STAGES = ["validate", "user_features", "retrieve", "item_features", "score", "rerank", "total"]


def _well_formed(run: dict, rate: float, lines: dict[str, float]) -> None:  # type: ignore[type-arg]
    assert run["offered_rps"] == rate and run["sent"] > 0
    assert run["recorded"] > 0 and run["ok"] == run["recorded"], run["errors"]
    assert run["errors"] == {}
    lat = run["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert lat["n"] == run["recorded"]
    pct = [p for p, _ in run["cdf_ms"]]
    ms = [v for _, v in run["cdf_ms"]]
    assert pct == sorted(pct) and ms == sorted(ms)
    for stage in [*STAGES, "client_overhead"]:
        s = run["stages_ms"][stage]
        assert s["n"] == run["ok"] and 0 < s["p50"] <= s["p99"] <= s["max"], stage
    assert set(run["budget_ms"]) == set(lines)
    for line, v in run["budget_ms"].items():
        assert v["budget_p99"] == lines[line], line
    taken = run["rungs"].values()
    assert max(taken, default=0) <= run["answers_on_a_rung"] <= min(run["ok"], sum(taken))
    # the server's total covers its stages; end to end covers the server's total
    assert run["stages_ms"]["total"]["max"] <= lat["max"] + 1e-3


def test_latency_budget_harness_end_to_end(bench_work: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "benchmarks.latency_budget",
        "--items", "20000", "--work", str(bench_work), "--results", str(results),
        "--rates", "4,8", "--full-sweep", "--step-s", "2", "--min-samples", "1", "--warmup", "1",
        "--sustain-rate", "5", "--sustain-s", "3", "--naive-rate", "2", "--naive-s", "2",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((results / "latency_budget.json").read_text())
    assert r["items"] == 20000 and r["settings"]["online_store"] == "redis"
    assert r["machine"]["cpus"] >= 1 and r["budget_ms"]["total"] == 50.0
    # the budget's lines are the ranker's StageBudgetMs, in its order, headroom apart
    budget = StageBudgetMs()
    lines = {k: v for k, v in r["budget_ms"].items() if k not in ("headroom", "total")}
    assert list(lines.values()) == [v for k, v in budget.model_dump().items() if k != "headroom"]
    assert r["budget_ms"]["headroom"] == budget.headroom
    assert sum(budget.model_dump().values()) == 50.0
    assert [s["offered_rps"] for s in r["sweep"]] == [4.0, 8.0]
    for s in r["sweep"]:
        _well_formed(s, s["offered_rps"], lines)
    _well_formed(r["sustained"], 5.0, lines)
    assert isinstance(r["sustained_within_budget"], bool)
    summary = r["sweep_summary"]
    assert summary["max_rate_within_budget"] in (None, 4.0, 8.0)
    assert summary["max_rate_full_quality"] in (None, 4.0, 8.0)
    naive = r["naive"]
    _well_formed(naive["sieve"], 2.0, lines)
    _well_formed(naive["naive"], 2.0, lines)
    assert set(naive["ratios"]) == {"end_to_end", *lines}
    assert all(v is None or v > 0 for line in naive["ratios"].values() for v in line.values())
    for png in ("latency_cdf.png", "latency_stages.png", "latency_sweep.png"):
        assert (results / png).stat().st_size > 10_000


def test_the_sweep_counts_a_rate_served_by_the_ladder_within_budget_but_not_at_full_quality(
    tmp_path: Path,
) -> None:
    def step(rate: float, p99: float, on_rung: int, errors: dict[str, int] | None = None) -> dict:  # type: ignore[type-arg]
        return {"offered_rps": rate, "latency_ms": {"p99": p99}, "errors": errors or {},
                "ok": 1000, "answers_on_a_rung": on_rung}  # fmt: skip

    def sweep_summary(steps: list[dict]) -> dict:  # type: ignore[type-arg]
        """The benchmark's summary of ``steps``, through its ``--summarize``."""
        saved = tmp_path / "result.json"
        saved.write_text(json.dumps({"sweep": steps}))
        cmd = [sys.executable, "-m", "benchmarks.latency_budget", "--summarize", str(saved)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return dict(json.loads(done.stdout))

    steps = [step(10, 12.0, 0), step(50, 20.0, 10), step(100, 30.0, 11), step(150, 49.0, 200),
             step(200, 45.0, 0, {"UNAVAILABLE": 1}), step(250, 80.0, 0)]  # fmt: skip
    summary = sweep_summary(steps)
    assert summary["max_rate_within_budget"] == 150  # 20% of its answers on a rung
    assert summary["max_rate_full_quality"] == 50  # 1.0% on a rung; 100/s has 1.1%
    assert summary["knee_rate"] == 100  # the first p99 over 2 x 12 ms
    assert sweep_summary(steps[-1:]) == {
        "max_rate_within_budget": None,
        "max_rate_full_quality": None,
        "full_quality_rung_share": 0.01,
        "knee_rate": None,
    }


def test_a_reused_set_is_rebuilt_when_its_model_is_not_the_default() -> None:
    from app.config import BuildConfig
    from app.reuse import model_differs
    from ranker.features import MODEL_FEATURES
    from sieve.manifest import ModelSection

    build = BuildConfig()
    now = {
        "features": list(MODEL_FEATURES),
        "hidden": list(build.hidden),
        "cross_layers": build.student_cross_layers,
    }
    names = {"input_name": "x", "output_name": "y"}

    def model(fields: dict) -> ModelSection:  # type: ignore[type-arg]
        """As a manifest's JSON is read: only the fields it names are set."""
        return ModelSection.model_validate({**names, **fields})

    assert model_differs(model(now)) == ""
    assert model_differs(model({**now, "cross_layers": now["cross_layers"] + 1})) == "cross_layers"
    assert model_differs(model({**now, "features": now["features"][:-1]})) == "features"
    older = {k: v for k, v in now.items() if k != "cross_layers"}  # a manifest without it
    assert model_differs(model(older)) == "cross_layers"
