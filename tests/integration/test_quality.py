"""The quality report end to end on the session's MovieLens build."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.quality import METRICS, evaluate
from sieve import artifacts


def test_quality_report_on_the_holdout(artifacts_root: Path) -> None:
    aset = artifacts.load(artifacts_root)
    hold = pd.read_parquet(aset.verified("holdout"))
    users_with_relevant = hold[hold["rating"] >= 4.0]["userId"].nunique()
    report = evaluate(artifacts_root)
    assert report["users"] == users_with_relevant
    names = ("popularity", "ann", "teacher", "student_fp32", "student_int8")
    assert tuple(report["results"]) == names
    for name in names:
        for mt in METRICS:
            v = report["results"][name][mt]
            assert 0.0 <= v["low"] <= v["mean"] <= v["high"] <= 1.0, (name, mt, v)
    # every model ranks the candidates far better than ANN order
    ann = report["results"]["ann"]["ndcg@10"]
    for name in names[2:]:
        assert report["results"][name]["ndcg@10"]["low"] > ann["high"], name
    for ratio in report["ratios"].values():
        assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
    assert 0.0 < report["funnel_recall"] <= 1.0
