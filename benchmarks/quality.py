"""Ranking quality on the held-out ratings, with bootstrap intervals over users.

    python -m benchmarks.quality --artifacts artifacts

For every user with a relevant held-out item (rating >= the build's positive
threshold): retrieve 1000 candidates as the service does (seen items excluded
inside the search), then rank them by popularity, by ANN order, and by the
artifact set's model (ONNX Runtime, the serving features). Reports NDCG@10,
NDCG@50, recall@50 (relevant items the funnel missed count as misses) and AUC over
the candidates, each with a 95% bootstrap interval; writes
``benchmarks/results/quality.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from candidate.index import CandidateIndex, parse_search_params
from ranker.evaluate import auc, bootstrap_ci, ndcg_at_k, recall_at_k
from ranker.features import assemble
from ranker.scorer import OnnxScorer
from sieve import artifacts

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("ndcg@10", "ndcg@50", "recall@50", "auc")


def evaluate(root: Path, n_candidates: int = 1000) -> dict[str, Any]:
    aset = artifacts.load(root)
    m = aset.manifest
    positive = float(m["build"]["config"]["positive_rating"])
    catalog_ids = pd.read_parquet(aset.verified("catalog"), columns=["item_id"])["item_id"]
    index = CandidateIndex.load(
        aset.verified("index"),
        catalog_ids.to_numpy(np.int64),
        aset.verified("user_vectors"),
        parse_search_params(m["index"].get("search_params", "")),
    )
    users = pd.read_parquet(aset.verified("user_features")).set_index("user_id")
    items = pd.read_parquet(aset.verified("item_features")).set_index("item_id")
    genres = np.stack(items["genres"].to_numpy())
    pop = items["log_popularity"].to_numpy(np.float32)
    rmean = items["rating_mean"].to_numpy(np.float32)
    row_of = pd.Series(np.arange(len(items)), index=items.index)
    by_pop = items.index.to_numpy()[np.argsort(-pop, kind="stable")]
    scorer = OnnxScorer(
        str(aset.verified("model")),
        m["model"]["input_name"],
        m["model"]["output_name"],
        m["model"]["features"],
        1,
    )
    scorer.load()
    hold = pd.read_parquet(aset.verified("holdout"))
    hold = hold[hold["rating"] >= positive]
    per: dict[str, dict[str, list[float]]] = {
        k: {mt: [] for mt in METRICS} for k in ("popularity", "ann", "model")
    }
    for user_id, group in hold.groupby("userId"):
        if user_id not in users.index:
            continue
        relevant = set(group["movieId"].astype(int))
        u = users.loc[user_id]
        seen = np.asarray(u["seen_item_ids"], np.int64)
        res = index.search(np.asarray(u["user_vector"], np.float32), n_candidates, seen)
        cand, cand_scores = res.item_ids, res.scores
        rows = row_of.loc[cand].to_numpy()
        x = assemble(
            ann_score=cand_scores,
            user_genre_affinity=np.asarray(u["genre_affinity"], np.float32)[None],
            item_genres=genres[rows],
            item_log_popularity=pop[rows],
            item_rating_mean=rmean[rows],
            user_rating_count=np.array([u["rating_count"]]),
            user_rating_mean=np.array([u["rating_mean"]], np.float32),
        )
        model_scores = scorer.score(x)
        labels = np.isin(cand, list(relevant))
        pop_list = by_pop[~np.isin(by_pop, seen)][:50]
        ranked = {
            "popularity": (pop_list, pop[rows]),
            "ann": (cand, cand_scores),
            "model": (cand[np.argsort(-model_scores, kind="stable")], model_scores),
        }
        for name, (order, cand_score) in ranked.items():
            per[name]["ndcg@10"].append(ndcg_at_k(order, relevant, 10))
            per[name]["ndcg@50"].append(ndcg_at_k(order, relevant, 50))
            per[name]["recall@50"].append(recall_at_k(order, relevant, 50))
            per[name]["auc"].append(auc(cand_score, labels))
    summary = {
        name: {
            mt: dict(zip(("mean", "low", "high"), bootstrap_ci(np.array(v)), strict=True))
            for mt, v in metrics.items()
        }
        for name, metrics in per.items()
    }
    return {
        "artifact_version": aset.version,
        "users": len(per["model"]["ndcg@10"]),
        "positive_rating": positive,
        "candidates": n_candidates,
        "bootstrap": {"resamples": 1000, "level": 0.95, "over": "users"},
        "results": summary,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["results"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(14, 3.8))
    for ax, mt in zip(axes, METRICS, strict=True):
        r = [result["results"][n][mt] for n in names]
        err = [[x["mean"] - x["low"] for x in r], [x["high"] - x["mean"] for x in r]]
        ax.bar(names, [x["mean"] for x in r], yerr=err, capsize=4, color=["C7", "C0", "C1"])
        ax.set_title(mt)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"MovieLens holdout, {result['users']} users, 95% bootstrap intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--name", default="quality")
    args = ap.parse_args()
    result = evaluate(Path(args.artifacts))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{args.name}.png")
    print(f"{result['users']} users with relevant held-out items")
    for name, metrics in result["results"].items():
        cells = "  ".join(
            f"{mt} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]" for mt, v in metrics.items()
        )
        print(f"{name:<11} {cells}")
    print(f"wrote {RESULTS / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
