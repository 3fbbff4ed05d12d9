"""Ranking quality on the held-out ratings, with bootstrap intervals over users.

For every user with a relevant held-out item (rating >= the build's positive
threshold): retrieve candidates as the ranker does (1000 from the ANN search with
seen items excluded inside it, plus the most popular unseen items it missed), then
rank them by popularity (over the whole catalog), by ANN order (the ANN
candidates alone), and by each of the set's models: the DCN-v2 teacher, the
distilled student in FP32 and in INT8 (ONNX Runtime, the serving features).
Reports NDCG@10, NDCG@50, recall@50 (relevant items the funnel missed count as
misses) and AUC over the candidates, each with a 95% bootstrap interval.

Then the diversity trade-off: the student FP32's scores through several re-rank
settings (``DIVERSITY``, the default chain among them), each scored by NDCG@10,
intra-list diversity of the 50 returned items and of the first 10 (mean pairwise
cosine distance of their text embeddings), the same over the items' genre
multi-hot vectors (genre ILD), and genre coverage of the 50 (share of the
catalog's genres present), with paired bootstrap ratios to plain score order.

``benchmarks/quality.py`` runs it and writes the JSON and plots; the integration
tests check it on the session's MovieLens build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from candidate.index import CandidateIndex, parse_search_params
from ranker.config import RerankConfig
from ranker.evaluate import auc, bootstrap_ci, ndcg_at_k, paired_ratio_ci, recall_at_k
from ranker.features import assemble, item_inputs, user_inputs, with_popular
from ranker.rerank import GroupCap, MinGroups, Mmr, PositionDecay, Rule, Slate, run_chain
from ranker.scorer import OnnxScorer
from sieve import artifacts
from sieve.data import GENRE_INDEX, GENRES

METRICS = ("ndcg@10", "ndcg@50", "recall@50", "auc")


MODELS = {"teacher": "teacher", "student_fp32": "model", "student_int8": "model_int8"}
"""Ranker variants in the report -> their artifact roles."""

DIVERSITY: dict[str, tuple[Rule, ...]] = {
    "score_order": (),
    "default": RerankConfig().rules,
    **{f"mmr_{lam}": (Mmr(lambda_=lam),) for lam in (0.9, 0.7, 0.5, 0.3)},
    "mmr_0.5_pool_100": (Mmr(lambda_=0.5, pool=100),),
    "mmr_0.5_pool_500": (Mmr(lambda_=0.5, pool=500),),
    "mmr_0.3_pool_1000": (Mmr(lambda_=0.3, pool=1000),),
    **{f"mmr_mean_{lam}": (Mmr(lambda_=lam, penalty="mean"),) for lam in (0.7, 0.5, 0.3)},
    "mmr_mean_0.5_pool_500": (Mmr(lambda_=0.5, pool=500, penalty="mean"),),
    "mmr_mean_0.3_pool_500": (Mmr(lambda_=0.3, pool=500, penalty="mean"),),
    "group_cap_5": (GroupCap(cap=5),),
    "group_cap_3": (GroupCap(cap=3),),
    "mmr_0.7+group_cap_5": (Mmr(lambda_=0.7), GroupCap(cap=5)),
    "position_decay_0.8": (PositionDecay(decay=0.8, floor=0.2),),
    "position_decay_0.5": (PositionDecay(decay=0.5, floor=0.1),),
    "min_groups_12": (MinGroups(n_groups=12),),
}
"""Re-rank settings in the trade-off (offline there is no shown-history, so the
default chain's fatigue rule changes nothing here)."""
DIVERSITY_METRICS = ("ndcg@10", "ild@50", "ild@10", "genre_ild@50", "genre_coverage@50")


def intra_list_diversity(vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance of the rows (0 for fewer than 2)."""
    n = len(vectors)
    if n < 2:
        return 0.0
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    return float((1.0 - sim[np.triu_indices(n, 1)]).mean())


def evaluate(root: Path, n_candidates: int = 1000) -> dict[str, Any]:
    """The quality report of the live set under ``root`` (see the module).

    Args:
        root: an artifacts root (``CURRENT`` names the set).
        n_candidates: ANN candidates per user, as the ranker asks for.

    Returns:
        The report: ``users``, ``results`` (per ranker, per ``METRICS``: mean and
        the 95% bootstrap interval), ``ratios`` (paired), ``funnel_recall`` and
        ``diversity`` (per ``DIVERSITY`` setting, per ``DIVERSITY_METRICS``, with
        paired ratios to score order).
    """
    aset = artifacts.load(root)
    m = aset.manifest
    positive = float(m.build.config["positive_rating"])
    n_popular = int(m.model.popular_candidates)
    catalog_ids = aset.read_catalog(["item_id"])["item_id"]
    index = CandidateIndex.load(
        aset.verified("index"),
        catalog_ids.to_numpy(np.int64),
        aset.verified("user_vectors"),
        parse_search_params(m.index.search_params),
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
        if role not in m.files:
            continue
        scorers[name] = OnnxScorer(
            str(aset.verified(role)),
            m.model.input_name,
            m.model.output_name,
            list(m.model.features),
            1,
        )
        scorers[name].load()
    hold = pd.read_parquet(aset.verified("holdout"))
    hold = hold[hold["rating"] >= positive]
    per: dict[str, dict[str, list[float]]] = {
        k: {mt: [] for mt in METRICS} for k in ("popularity", "ann", *scorers)
    }
    recall_funnel: list[float] = []
    div: dict[str, dict[str, list[float]]] = {
        k: {mt: [] for mt in DIVERSITY_METRICS} for k in DIVERSITY
    }
    primary = items["primary_genre"].to_numpy(np.int64)
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
            if name == "student_fp32":
                emb = np.asarray(embeddings[emb_row.loc[cand].to_numpy()], np.float32)
                slate = Slate(
                    ids=cand,
                    attributes={
                        "primary_genre": primary[rows],
                        "genres": item_cols["genres"][rows],
                        "age_years": item_cols["age_years"][rows],
                    },
                    embeddings_of=emb.__getitem__,
                    attribute_of=lambda ids, col: np.empty(0, np.int64),
                    exclude=np.sort(seen),
                    categories=GENRE_INDEX,
                )
                for setting, rules in DIVERSITY.items():
                    top = run_chain(rules, slate, s, 50).chosen
                    d = div[setting]
                    d["ndcg@10"].append(ndcg_at_k(cand[top], relevant, 10))
                    d["ild@50"].append(intra_list_diversity(emb[top]))
                    d["ild@10"].append(intra_list_diversity(emb[top[:10]]))
                    d["genre_ild@50"].append(intra_list_diversity(item_cols["genres"][rows[top]]))
                    covered = (item_cols["genres"][rows[top]] > 0).any(axis=0)
                    d["genre_coverage@50"].append(float(covered.sum()) / len(GENRES))
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
    diversity: dict[str, Any] = {}
    base = div["score_order"]
    for setting, metrics in div.items():
        row: dict[str, Any] = {
            "rules": [r.model_dump(by_alias=True) for r in DIVERSITY[setting]],
            **{
                mt: dict(zip(("mean", "low", "high"), bootstrap_ci(np.array(v)), strict=True))
                for mt, v in metrics.items()
            },
        }
        for mt in ("ndcg@10", "ild@50", "ild@10", "genre_ild@50"):
            r, low, high = paired_ratio_ci(np.array(metrics[mt]), np.array(base[mt]))
            row[f"{mt} / score_order"] = {"ratio": r, "low": low, "high": high}
        diversity[setting] = row
    return {
        "artifact_version": aset.version,
        "users": len(per["ann"]["ndcg@10"]),
        "positive_rating": positive,
        "candidates": {"ann": n_candidates, "popular": n_popular},
        "funnel_recall": float(np.mean(recall_funnel)),
        "bootstrap": {"resamples": 1000, "level": 0.95, "over": "users"},
        "results": summary,
        "ratios": ratios,
        "diversity": {"model": "student_fp32", "k": 50, "settings": diversity},
    }
