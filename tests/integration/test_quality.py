"""The quality report end to end on the session's MovieLens build."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from app.quality import DIVERSITY, DIVERSITY_METRICS, METRICS, evaluate
from sieve import artifacts


def test_quality_report_on_the_holdout(artifacts_root: Path) -> None:
    aset = artifacts.load(artifacts_root)
    hold = pd.read_parquet(aset.verified("holdout"))
    users_with_relevant = hold[hold["rating"] >= 4.0]["userId"].nunique()
    # the baselines' tuning on small grids (the benchmark runs app.baselines.GRIDS)
    report = evaluate(
        artifacts_root,
        grids={
            "ease": {"lambda_": (300.0,)},
            "ials": {"factors": (32,), "regularization": (1.0,), "alpha": (1.0,),
                     "iterations": (5,)},
        },
    )  # fmt: skip
    assert report["users"] == users_with_relevant
    names = ("popularity", "ann", "teacher", "student_fp32", "student_int8")
    assert tuple(report["results"]) == names
    for name in names:
        for mt in METRICS:
            v = report["results"][name][mt]
            assert 0.0 <= v["low"] <= v["mean"] <= v["high"] <= 1.0, (name, mt, v)
    # the learned ANN order alone beats popularity; every model beats the ANN order
    res = report["results"]
    assert res["ann"]["ndcg@10"]["mean"] > res["popularity"]["ndcg@10"]["mean"]
    for name in names[2:]:
        assert res[name]["ndcg@10"]["mean"] > res["ann"]["ndcg@10"]["mean"], name
    for ratio in report["ratios"].values():
        assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
    # every source finds some held-out positives; together more than any one
    by_source = report["funnel_recall_by_source"]
    assert set(by_source) == {"funnel", "learned", "text", "i2i", "popular"}
    assert all(v > 0 for v in by_source.values()), by_source
    assert by_source["funnel"] == report["funnel_recall"]
    assert by_source["funnel"] > max(v for k, v in by_source.items() if k != "funnel")
    # positives of items nobody rated before the split are counted apart, and reached
    cold = report["cold_items"]
    assert cold["held_out_positives"] > 0 and 0 < cold["funnel"] <= cold["held_out_positives"]
    # the baselines: tuned on the validation split (each setting tried is listed),
    # scored with the same metric code, and sieve's served model compared to the best
    b = report["baselines"]
    assert set(b["methods"]) == {"popularity", "ease", "ials"}
    assert [v["lambda_"] for v in b["methods"]["ease"]["validation"]] == [300.0]
    assert b["methods"]["ease"]["params"] == {"lambda_": 300.0}
    assert 0.0 < b["methods"]["ease"]["validation"][0]["ndcg@10"] < 1.0
    assert b["best"] in b["methods"]
    pop = b["methods"]["popularity"]["results"]["ndcg@10"]["mean"]
    assert pop == pytest.approx(res["popularity"]["ndcg@10"]["mean"], abs=0.02)
    ratio = b["student_fp32 / best ndcg@10"]
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"]
    for v in b["methods"].values():
        assert 0.0 <= v["recall_at_funnel_size"]["mean"] <= 1.0
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
