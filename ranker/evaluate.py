"""Offline ranking quality: per-user metrics and bootstrap intervals. Pure numpy.

Relevance is binary (a held-out rating at or above the positive threshold). A
relevant item the funnel never retrieved counts as missed: the metrics measure
the whole funnel, not the ranker alone.
"""

from __future__ import annotations

import numpy as np


def ndcg_at_k(ranked: np.ndarray, relevant: set[int], k: int) -> float:
    """NDCG@k of one ranked list of ids against a set of relevant ids (binary gains)."""
    if not relevant:
        raise ValueError("ndcg_at_k needs at least one relevant item")
    top = ranked[:k]
    gains = np.fromiter((1.0 if int(i) in relevant else 0.0 for i in top), float, len(top))
    discounts = 1.0 / np.log2(np.arange(2, len(top) + 2))
    ideal = discounts[: min(k, len(relevant))].sum()
    return float((gains * discounts).sum() / ideal)


def recall_at_k(ranked: np.ndarray, relevant: set[int], k: int) -> float:
    """Share of the relevant ids found in the top k."""
    if not relevant:
        raise ValueError("recall_at_k needs at least one relevant item")
    return sum(1 for i in ranked[:k] if int(i) in relevant) / len(relevant)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (ties count one half); NaN when
    one class is missing."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), float)
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_ci(
    values: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over users of the per-user ``values``
    (NaNs, e.g. AUC of a user without positives among candidates, are left out)."""
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_resamples, len(v)))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(v.mean()), float(low), float(high)


def paired_ratio_ci(
    a: np.ndarray, b: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(ratio, low, high) of mean(a) / mean(b), resampling the same users for both,
    so the interval reflects the models' difference, not the users' spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(a), (n_resamples, len(a)))
    ratios = a[pick].mean(axis=1) / np.maximum(b[pick].mean(axis=1), 1e-12)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return float(a.mean() / max(b.mean(), 1e-12)), float(low), float(high)
