"""Ranking quality on the held-out ratings, with bootstrap intervals over users.

    python -m benchmarks.quality --artifacts artifacts

For every user with a relevant held-out item (rating >= the build's positive
threshold): retrieve candidates as the ranker does (1000 from the ANN search with
seen items excluded inside it, plus the most popular unseen items it missed), then
rank them by popularity (over the whole catalog), by ANN order (the ANN
candidates alone), and by each of the set's models: the DCN-v2 teacher, the
distilled student in FP32 and in INT8 (ONNX Runtime, the serving features).
Reports NDCG@10,
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
from ranker.evaluate import auc, bootstrap_ci, ndcg_at_k, paired_ratio_ci, recall_at_k
from ranker.features import assemble, item_inputs, user_inputs, with_popular
from ranker.scorer import OnnxScorer
from sieve import artifacts

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("ndcg@10", "ndcg@50", "recall@50", "auc")


MODELS = {"teacher": "teacher", "student_fp32": "model", "student_int8": "model_int8"}
"""Ranker variants in the report -> their artifact roles."""


def evaluate(root: Path, n_candidates: int = 1000) -> dict[str, Any]:
    aset = artifacts.load(root)
    m = aset.manifest
    positive = float(m["build"]["config"]["positive_rating"])
    n_popular = int(m["model"].get("popular_candidates", 0))
    catalog_ids = pd.read_parquet(aset.verified("catalog"), columns=["item_id"])["item_id"]
    index = CandidateIndex.load(
        aset.verified("index"),
        catalog_ids.to_numpy(np.int64),
        aset.verified("user_vectors"),
        parse_search_params(m["index"].get("search_params", "")),
    )
    embeddings = np.load(aset.verified("item_embeddings"), mmap_mode="r")
    users = pd.read_parquet(aset.verified("user_features")).set_index("user_id")
    items = pd.read_parquet(aset.verified("item_features")).set_index("item_id")
    item_cols = item_inputs(items)
    pop = item_cols["log_popularity"].astype(np.float32)
    row_of = pd.Series(np.arange(len(items)), index=items.index)
    emb_row = pd.Series(np.arange(len(catalog_ids)), index=catalog_ids.to_numpy())
    by_pop = items.index.to_numpy()[np.argsort(-pop, kind="stable")]
    scorers = {}
    for name, role in MODELS.items():
        if role not in m["files"]:
            continue
        scorers[name] = OnnxScorer(
            str(aset.verified(role)),
            m["model"]["input_name"],
            m["model"]["output_name"],
            m["model"]["features"],
            1,
        )
        scorers[name].load()
    hold = pd.read_parquet(aset.verified("holdout"))
    hold = hold[hold["rating"] >= positive]
    per: dict[str, dict[str, list[float]]] = {
        k: {mt: [] for mt in METRICS} for k in ("popularity", "ann", *scorers)
    }
    recall_funnel: list[float] = []
    for user_id, group in hold.groupby("userId"):
        if user_id not in users.index:
            continue
        relevant = set(group["movieId"].astype(int))
        u = users.loc[user_id]
        seen = np.asarray(u["seen_item_ids"], np.int64)
        vector = np.asarray(u["user_vector"], np.float32)
        res = index.search(vector, n_candidates, seen)
        cand, cand_scores, ranks = with_popular(
            res.item_ids,
            res.scores,
            by_pop,
            seen,
            n_popular,
            vector,
            lambda ids: np.asarray(embeddings[emb_row.loc[ids].to_numpy()]),
        )
        rows = row_of.loc[cand].to_numpy()
        x = assemble(cand_scores, ranks, user_inputs(u), {c: v[rows] for c, v in item_cols.items()})
        labels = np.isin(cand, list(relevant))
        recall_funnel.append(float(labels.sum()) / len(relevant))
        pop_list = by_pop[~np.isin(by_pop, seen)][:50]
        ann = ranks >= 0
        ranked = {
            "popularity": (pop_list, pop[rows], labels),
            "ann": (cand[ann], cand_scores[ann], labels[ann]),
        }
        for name, scorer in scorers.items():
            s = scorer.score(x)
            ranked[name] = (cand[np.argsort(-s, kind="stable")], s, labels)
        for name, (order, cand_score, lab) in ranked.items():
            per[name]["ndcg@10"].append(ndcg_at_k(order, relevant, 10))
            per[name]["ndcg@50"].append(ndcg_at_k(order, relevant, 50))
            per[name]["recall@50"].append(recall_at_k(order, relevant, 50))
            per[name]["auc"].append(auc(cand_score, lab))
    summary = {
        name: {
            mt: dict(zip(("mean", "low", "high"), bootstrap_ci(np.array(v)), strict=True))
            for mt, v in metrics.items()
        }
        for name, metrics in per.items()
    }
    ratios = {}
    for num, den in (("student_fp32", "teacher"), ("student_int8", "student_fp32")):
        if num in per and den in per:
            r, low, high = paired_ratio_ci(
                np.array(per[num]["ndcg@10"]), np.array(per[den]["ndcg@10"])
            )
            ratios[f"{num}/{den} ndcg@10"] = {"ratio": r, "low": low, "high": high}
    return {
        "artifact_version": aset.version,
        "users": len(per["ann"]["ndcg@10"]),
        "positive_rating": positive,
        "candidates": {"ann": n_candidates, "popular": n_popular},
        "funnel_recall": float(np.mean(recall_funnel)),
        "bootstrap": {"resamples": 1000, "level": 0.95, "over": "users"},
        "results": summary,
        "ratios": ratios,
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
        ax.bar(
            names,
            [x["mean"] for x in r],
            yerr=err,
            capsize=4,
            color=[f"C{i}" for i in range(len(names))],
        )
        ax.set_title(mt)
        ax.tick_params(axis="x", rotation=35)
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
        print(f"{name:<13} {cells}")
    for name, v in result["ratios"].items():
        print(f"{name}: {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}] (paired bootstrap)")
    print(
        f"funnel recall (relevant held-out items among the candidates): "
        f"{result['funnel_recall']:.3f}"
    )
    print(f"wrote {RESULTS / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
