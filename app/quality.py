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
from ranker.diversity import compact_space
from ranker.evaluate import auc, bootstrap_ci, ndcg_at_k, paired_ratio_ci, recall_at_k
from ranker.features import item_inputs
from ranker.funnel import OfflineFunnel
from ranker.rerank import (
    GroupCap,
    MinGroups,
    Mmr,
    PositionDecay,
    Rule,
    Slate,
    run_chain,
)
from ranker.scorer import OnnxScorer
from ranker.sources import BIT, SOURCES
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


def training_part(aset: artifacts.ArtifactSet) -> tuple[pd.DataFrame, np.ndarray] | None:
    """The set's training ratings and catalog ids, rebuilt from its source and its
    build config (the split is deterministic), or None when the source is gone."""
    from sieve.data import load_movielens, split
    from sieve.synthetic import synthetic_catalog

    m = aset.manifest
    cfg = m.build.config
    if "data_dir" in m.source:
        data = Path(m.source["data_dir"])
        if not (data / "ratings.csv").is_file():
            return None
        ml = load_movielens(data)
        movies, ratings = ml.movies, ml.ratings
    elif "synthetic" in m.source:
        syn = m.source["synthetic"]
        cat = synthetic_catalog(int(syn["n_items"]), seed=int(syn["seed"]))
        movies, ratings = cat.movies, cat.ratings
    else:
        return None
    if "events" in m.source:  # the build's event ratings, from the same log
        from app.build import with_event_ratings
        from sieve.data import MovieLens

        log_dir = Path(m.source["events"]["dir"])
        if not log_dir.is_dir():
            return None
        ml_all = MovieLens(movies=movies, ratings=ratings, tags=pd.DataFrame())
        ratings = with_event_ratings(ml_all, log_dir)[0].ratings
    train, _ = split(ratings, float(cfg["holdout_fraction"]), str(cfg.get("split", "user")))
    return train, movies["movieId"].to_numpy(np.int64)


def _ci(values: list[float]) -> dict[str, float]:
    return dict(zip(("mean", "low", "high"), bootstrap_ci(np.array(values)), strict=True))


def _ratio(a: list[float], b: list[float]) -> dict[str, float]:
    r, low, high = paired_ratio_ci(np.array(a), np.array(b))
    return {"ratio": r, "low": low, "high": high}


def offline_funnel(
    aset: artifacts.ArtifactSet,
) -> tuple[OfflineFunnel, pd.DataFrame, pd.DataFrame]:
    """The set's funnel as the training code computes it (its indexes, tables and
    neighbours), its user table (by user id) and item table (catalog order)."""
    m = aset.manifest
    assert m.text_index is not None
    catalog_ids = aset.read_catalog(["item_id"])["item_id"].to_numpy(np.int64)
    learned_index = CandidateIndex.load(
        aset.verified("index"),
        catalog_ids,
        aset.verified("user_vectors"),
        parse_search_params(m.index.search_params),
    )
    text_index = CandidateIndex.load(
        aset.verified("text_index"),
        catalog_ids,
        aset.verified("text_user_vectors"),
        parse_search_params(m.text_index.search_params),
    )
    users = pd.read_parquet(aset.verified("user_features")).set_index("user_id")
    items = pd.read_parquet(aset.verified("item_features")).set_index("item_id")
    items = items.loc[catalog_ids]  # catalog order, as the funnel indexes them
    item_cols = item_inputs(items)
    pop = item_cols["log_popularity"].astype(np.float32)
    funnel = OfflineFunnel(
        item_ids=catalog_ids,
        item_vectors=np.load(aset.verified("item_embeddings")),
        text_embeddings=np.asarray(np.load(aset.verified("text_embeddings"), mmap_mode="r")),
        neighbour_rows=np.load(aset.verified("item_neighbours")),
        neighbour_scores=np.load(aset.verified("item_neighbour_scores")),
        popular_ids=catalog_ids[np.argsort(-pop, kind="stable")],
        item_cols=item_cols,
        learned_search=learned_index.top,
        text_search=text_index.top,
        quotas=dict(m.model.sources),
    )
    return funnel, users, items


def evaluate(
    root: Path, baselines: bool = True, grids: dict[str, dict[str, tuple[Any, ...]]] | None = None
) -> dict[str, Any]:
    """The quality report of the live set under ``root`` (see the module).

    Args:
        root: an artifacts root (``CURRENT`` names the set).
        baselines: also tune, fit and score popularity, EASE^R and iALS (needs the
            set's source data; EASE only up to ``EASE_MAX_ITEMS`` items).
        grids: the settings each baseline's tuning tries (default
            ``app.baselines.GRIDS``).

    Returns:
        The report: ``users``, ``results`` (per ranker, per ``METRICS``: mean and
        the 95% bootstrap interval), ``ratios`` (paired), ``funnel_recall`` (all
        sources and per source), ``cold_items``, ``baselines`` and ``diversity``
        (per ``DIVERSITY`` setting, per ``DIVERSITY_METRICS``, with paired ratios
        to score order).
    """
    aset = artifacts.load(root)
    m = aset.manifest
    if m.text_index is None or m.retriever is None:
        raise ValueError(f"{aset.root}: a set built before the learned retriever; rebuild it")
    positive = float(m.build.config["positive_rating"])
    funnel, users, items = offline_funnel(aset)
    catalog_ids, item_cols = funnel.item_ids, funnel.item_cols
    text = funnel.text_embeddings
    dims = RerankConfig().diversity_dims  # the diversity rules' space, as served
    div_space = compact_space(text, dims) if 0 < dims < text.shape[1] else np.asarray(text)
    pop = item_cols["log_popularity"].astype(np.float32)
    by_pop = funnel.popular_ids
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
    hold = hold[hold["userId"].isin(users.index)]
    relevant_of = hold.groupby("userId")["movieId"].apply(lambda s: {int(i) for i in s})
    cold = set(catalog_ids[pop == 0].tolist())  # no training rating
    per: dict[str, dict[str, list[float]]] = {
        k: {mt: [] for mt in METRICS} for k in ("popularity", "ann", *scorers)
    }
    recall: dict[str, list[float]] = {k: [] for k in ("funnel", *SOURCES)}
    n_cand: list[int] = []
    cold_found = {"held_out_positives": 0, "funnel": 0, "student_top50": 0}
    div: dict[str, dict[str, list[float]]] = {
        k: {mt: [] for mt in DIVERSITY_METRICS} for k in DIVERSITY
    }
    primary = items["primary_genre"].to_numpy(np.int64)
    order_users = list(relevant_of.index)
    cand_lists: dict[int, np.ndarray] = {}
    for user_id in order_users:
        relevant = relevant_of[user_id]
        u = users.loc[user_id]
        seen = np.sort(np.asarray(u["seen_item_ids"], np.int64))
        cand = funnel.candidates(u, seen)
        x = funnel.inputs(u, cand)
        ids = cand.ids
        cand_lists[int(user_id)] = ids
        rows, _ = funnel.rows.rows(ids)
        labels = np.isin(ids, list(relevant))
        n_cand.append(len(ids))
        recall["funnel"].append(float(labels.sum()) / len(relevant))
        for src in SOURCES:
            hit = labels & ((cand.sources & BIT[src]) > 0)
            recall[src].append(float(hit.sum()) / len(relevant))
        cold_rel = relevant & cold
        cold_found["held_out_positives"] += len(cold_rel)
        cold_found["funnel"] += int(np.isin(ids, list(cold_rel)).sum()) if cold_rel else 0
        pop_list = by_pop[~np.isin(by_pop, seen)][:50]
        learned = cand.learned_rank >= 0
        ann_scores = x[:, 0]
        ranked = {
            "popularity": (pop_list, pop[rows], labels),
            "ann": (ids[learned], ann_scores[learned], labels[learned]),
        }
        for name, scorer in scorers.items():
            s = scorer.score(x)
            ranked[name] = (ids[np.argsort(-s, kind="stable")], s, labels)
            if name == "student_fp32":
                if cold_rel:
                    top50 = ranked[name][0][:50]
                    cold_found["student_top50"] += int(np.isin(top50, list(cold_rel)).sum())
                text_emb = np.asarray(text[rows], np.float32)
                slate = Slate(
                    ids=ids,
                    attributes={
                        "primary_genre": primary[rows],
                        "genres": item_cols["genres"][rows],
                        "age_years": item_cols["age_years"][rows],
                    },
                    embeddings_of=np.asarray(div_space[rows]).__getitem__,
                    attribute_of=lambda ids, col: np.empty(0, np.int64),
                    exclude=seen,
                    categories=GENRE_INDEX,
                )
                for setting, rules in DIVERSITY.items():
                    top = run_chain(rules, slate, s, 50).chosen
                    d = div[setting]
                    d["ndcg@10"].append(ndcg_at_k(ids[top], relevant, 10))
                    d["ild@50"].append(intra_list_diversity(text_emb[top]))
                    d["ild@10"].append(intra_list_diversity(text_emb[top[:10]]))
                    d["genre_ild@50"].append(intra_list_diversity(item_cols["genres"][rows[top]]))
                    covered = (item_cols["genres"][rows[top]] > 0).any(axis=0)
                    d["genre_coverage@50"].append(float(covered.sum()) / len(GENRES))
        for name, (order, cand_score, lab) in ranked.items():
            per[name]["ndcg@10"].append(ndcg_at_k(order, relevant, 10))
            per[name]["ndcg@50"].append(ndcg_at_k(order, relevant, 50))
            per[name]["recall@50"].append(recall_at_k(order, relevant, 50))
            per[name]["auc"].append(auc(cand_score, lab))
    summary = {name: {mt: _ci(v) for mt, v in metrics.items()} for name, metrics in per.items()}
    ratios = {}
    for num, den in (("student_fp32", "teacher"), ("student_int8", "student_fp32")):
        if num in per and den in per:
            ratios[f"{num}/{den} ndcg@10"] = _ratio(per[num]["ndcg@10"], per[den]["ndcg@10"])
    diversity: dict[str, Any] = {}
    base = div["score_order"]
    for setting, metrics in div.items():
        row: dict[str, Any] = {
            "rules": [r.model_dump(by_alias=True) for r in DIVERSITY[setting]],
            **{mt: _ci(v) for mt, v in metrics.items()},
        }
        for mt in ("ndcg@10", "ild@50", "ild@10", "genre_ild@50"):
            row[f"{mt} / score_order"] = _ratio(metrics[mt], base[mt])
        diversity[setting] = row
    report: dict[str, Any] = {
        "artifact_version": aset.version,
        "split": m.build.config.get("split", "user"),
        "seed": m.build.config.get("seed", 0),
        "users": len(per["ann"]["ndcg@10"]),
        "positive_rating": positive,
        "candidates": {"quotas": dict(m.model.sources), "mean_per_user": float(np.mean(n_cand))},
        "funnel_recall": float(np.mean(recall["funnel"])),
        "funnel_recall_by_source": {k: float(np.mean(v)) for k, v in recall.items()},
        "cold_items": cold_found,
        "bootstrap": {"resamples": 1000, "level": 0.95, "over": "users"},
        "results": summary,
        "ratios": ratios,
        "retriever_validation": dict(m.retriever.validation),
        "diversity": {"model": "student_fp32", "k": 50, "settings": diversity},
    }
    if baselines:
        report["baselines"] = _baselines(
            aset, relevant_of, cand_lists, per, positive, order_users, grids
        )
    return report


def _baselines(
    aset: artifacts.ArtifactSet,
    relevant_of: pd.Series,
    cand_lists: dict[int, np.ndarray],
    per: dict[str, dict[str, list[float]]],
    positive: float,
    order_users: list[Any],
    grids: dict[str, dict[str, tuple[Any, ...]]] | None,
) -> dict[str, Any]:
    """Popularity, EASE^R and iALS tuned on the validation split, refit on all
    training ratings, as full rankers (top 50) and as retrievers (the top n of
    each, n the size of sieve's funnel for that user); with paired ratios of
    sieve's served model (student FP32) to the best of them."""
    from app.baselines import (
        EASE_MAX_ITEMS,
        FITS,
        GRIDS,
        fit_popularity,
        interactions,
        top_unseen,
        tune,
    )
    from sieve.data import split

    part = training_part(aset)
    if part is None:
        return {"skipped": "the set's source data is not readable"}
    train, item_ids = part
    cfg = aset.manifest.build.config
    early, late = split(train, float(cfg["label_fraction"]), str(cfg.get("split", "user")))
    inter = interactions(train, item_ids)
    users = [int(u) for u in order_users]
    n_max = max(len(c) for c in cand_lists.values())
    out: dict[str, Any] = {}
    fits: dict[str, Any] = {"popularity": (fit_popularity, {})}
    for name, fit in FITS.items():
        grid = (grids or GRIDS)[name]
        if name == "ease" and len(item_ids) > EASE_MAX_ITEMS:
            out[name] = {"skipped": f"{len(item_ids)} items > {EASE_MAX_ITEMS} (dense EASE)"}
            continue
        tuned = tune(name, fit, grid, early, late, item_ids, positive)
        fits[name] = (fit, tuned.params)
        out[name] = {"params": tuned.params, "validation": tuned.validation}
    lists_of: dict[str, dict[int, np.ndarray]] = {}
    for name, (fit, params) in fits.items():
        lists = top_unseen(fit(inter.matrix, **params), inter, users, item_ids, n_max)
        lists_of[name] = lists
        metrics: dict[str, list[float]] = {mt: [] for mt in ("ndcg@10", "ndcg@50", "recall@50")}
        as_retriever: list[float] = []
        for u in users:
            rel, order = relevant_of[u], lists[u]
            metrics["ndcg@10"].append(ndcg_at_k(order, rel, 10))
            metrics["ndcg@50"].append(ndcg_at_k(order, rel, 50))
            metrics["recall@50"].append(recall_at_k(order, rel, 50))
            as_retriever.append(recall_at_k(order, rel, len(cand_lists[u])))
        entry = out.setdefault(name, {})
        entry["results"] = {mt: _ci(v) for mt, v in metrics.items()}
        entry["recall_at_funnel_size"] = _ci(as_retriever)
        entry["per_user_ndcg@10"] = metrics["ndcg@10"]
    scored = {k: v for k, v in out.items() if "results" in v}
    best = max(scored, key=lambda k: scored[k]["results"]["ndcg@10"]["mean"])
    ours = per["student_fp32"]["ndcg@10"] if "student_fp32" in per else []
    summary: dict[str, Any] = {"best": best, "methods": out}
    if ours:
        summary["student_fp32 / best ndcg@10"] = _ratio(ours, scored[best]["per_user_ndcg@10"])
        summary["ann / best ndcg@10"] = _ratio(
            per["ann"]["ndcg@10"], scored[best]["per_user_ndcg@10"]
        )
    for v in out.values():
        v.pop("per_user_ndcg@10", None)
    return summary
