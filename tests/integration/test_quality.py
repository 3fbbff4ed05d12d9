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
    for name in ("popularity", "ann", "model"):
        for mt in METRICS:
            v = report["results"][name][mt]
            assert 0.0 <= v["low"] <= v["mean"] <= v["high"] <= 1.0, (name, mt, v)
    # the trained model must rank the retrieved candidates far better than ANN order
    model, ann = report["results"]["model"]["ndcg@10"], report["results"]["ann"]["ndcg@10"]
    assert model["low"] > ann["high"]
