"""The quality report end to end on the session's MovieLens build."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from app.quality import DIVERSITY, DIVERSITY_METRICS, METRICS, evaluate
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
    # the diversity trade-off: every setting present and well-formed; the rules
    # do what they are for (MMR spreads embeddings, the genre cap spreads genres)
    div = report["diversity"]["settings"]
    assert set(div) == set(DIVERSITY)
    for name, row in div.items():
        for mt in DIVERSITY_METRICS:
            assert 0.0 <= row[mt]["low"] <= row[mt]["mean"] <= row[mt]["high"] <= 1.0, (name, mt)
    assert (
        div["score_order"]["ndcg@10"]["mean"]
        == report["results"]["student_fp32"]["ndcg@10"]["mean"]
    )
    assert div["mmr_0.3"]["ild@50 / score_order"]["low"] > 1.0
    assert (
        div["group_cap_3"]["genre_coverage@50"]["mean"]
        > div["score_order"]["genre_coverage@50"]["mean"]
    )
