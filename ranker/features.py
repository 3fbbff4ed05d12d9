"""The ranking model's input row, assembled from user, item and candidate features.

Pure numpy, used by training (many users at once), serving (one user, ~1200
candidates) and the quality report, so the model sees the same features in all
three places. The column list is versioned with the model in the manifest.

Candidates come from two sources: the ANN search (rank 0..n-1, score = inner
product of user vector and item embedding) and the most popular unseen items the
search missed (``NOT_RETRIEVED`` rank, score computed here from the embeddings),
since a content-based search alone misses most of what users rate next.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sieve.data import GENRES
from sieve.ids import member

NOT_RETRIEVED = -1
"""Candidate rank of an item that came from the popular source, not the ANN search."""
_RANK_OF_MISSING = 2048.0  # past any ANN rank (k <= 2048)

CROSS = (
    "ann_score",  # user vector . item embedding
    "log_candidate_rank",  # log1p of the ANN rank; log1p(2048) when not retrieved
    "from_ann",  # 1 if the ANN search returned the item
    "genre_match",  # user's genre affinity . item's genre multi-hot
    "genre_cosine",  # the same, as a cosine
    "rating_gap",  # item_rating_mean - user_rating_mean
    # the item at the user's time (the year of the user's last rating, ``idle_years``
    # before the cut-off), from its per-year rating history
    "era_log_popularity",  # log1p of its ratings in that year and the year before
    "era_share_rated",  # share of its ratings made by the end of that year
    "era_age_years",  # item_age_years - user idle_years: its age then (< 0: not out yet)
)
ITEM = (
    "item_log_popularity",
    "item_rating_mean",
    "item_age_years",  # time since the item's first rating, at the training cut-off
    *(f"item_genre={g}" for g in GENRES),
)
USER = (
    "user_log_rating_count",
    "user_rating_mean",
    "user_rating_std",
    *(f"user_genre={g}" for g in GENRES),
)
MODEL_FEATURES: tuple[str, ...] = (*CROSS, *ITEM, *USER)
"""Column order of the model's ``features`` input; versioned in the manifest."""
USER_INPUTS = ("genre_affinity", "rating_count", "rating_mean", "rating_std", "idle_years")
ITEM_INPUTS = ("genres", "log_popularity", "rating_mean", "age_years", "rating_history")
"""The online features ``assemble`` reads (names of the Feast views' fields)."""


def assemble(
    ann_score: np.ndarray,
    candidate_rank: np.ndarray,
    user: Mapping[str, np.ndarray],
    item: Mapping[str, np.ndarray],
) -> np.ndarray:
    """Model input rows, float32 [n, len(MODEL_FEATURES)].

    Args:
        ann_score: [n] user vector . item embedding.
        candidate_rank: [n] ANN rank, or ``NOT_RETRIEVED``.
        user: ``USER_INPUTS`` arrays with n rows or one (broadcast); list
            features are [n or 1, G].
        item: ``ITEM_INPUTS`` arrays with n rows.
    """
    n = len(ann_score)
    out = np.empty((n, len(MODEL_FEATURES)), dtype=np.float32)
    g = len(GENRES)
    affinity = np.broadcast_to(np.asarray(user["genre_affinity"], np.float32), (n, g))
    genres = np.asarray(item["genres"], np.float32)
    rank = np.asarray(candidate_rank)
    retrieved = rank >= 0
    item_mean = np.asarray(item["rating_mean"], np.float32)
    user_mean = np.broadcast_to(np.asarray(user["rating_mean"], np.float32), (n,))
    match = np.einsum("ij,ij->i", affinity, genres)
    norms = np.linalg.norm(affinity, axis=1) * np.linalg.norm(genres, axis=1)
    out[:, 0] = ann_score
    out[:, 1] = np.log1p(np.where(retrieved, rank, _RANK_OF_MISSING))
    out[:, 2] = retrieved
    out[:, 3] = match
    out[:, 4] = match / np.maximum(norms, 1e-6)
    out[:, 5] = item_mean - user_mean
    history = np.asarray(item["rating_history"], np.float32)
    idle = np.asarray(user["idle_years"], np.float32).reshape(-1)
    last = history.shape[1] - 1
    year = np.clip(np.nan_to_num(idle, nan=0.0), 0, last).astype(np.int64)
    if len(year) == 1:  # one user, as served: column slices, a third of the cost
        k = int(year[0])
        era = history[:, k] + (history[:, k + 1] if k < last else 0.0)
        by_then = history[:, k:].sum(axis=1)
    else:  # a user per row, as in training
        at = np.arange(n)
        era = history[at, year] + np.where(year < last, history[at, np.minimum(year + 1, last)], 0)
        by_then = np.einsum("ij,ij->i", history, np.arange(last + 1) >= year[:, None])
    out[:, 6] = np.log1p(era)
    out[:, 7] = by_then / np.maximum(history.sum(axis=1), 1.0)
    out[:, 8] = np.asarray(item["age_years"], np.float32) - idle
    c = len(CROSS)
    out[:, c] = item["log_popularity"]
    out[:, c + 1] = item_mean
    out[:, c + 2] = item["age_years"]
    out[:, c + 3 : c + 3 + g] = genres
    u = len(CROSS) + len(ITEM)
    out[:, u] = np.log1p(np.asarray(user["rating_count"], np.float32))
    out[:, u + 1] = user_mean
    out[:, u + 2] = user["rating_std"]
    out[:, u + 3 : u + 3 + g] = affinity
    return out


def user_inputs(row: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``USER_INPUTS`` of one user (a row of the user feature table) as one-row
    arrays, the shape ``assemble`` broadcasts."""
    return {name: np.asarray(row[name], np.float32)[None] for name in USER_INPUTS}


def item_inputs(table: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``ITEM_INPUTS`` columns of an item feature table (list features stacked to
    [n, G]); index them by rows for ``assemble``."""
    out = {}
    for name in ITEM_INPUTS:
        col = np.asarray(table[name])
        out[name] = np.stack(list(col)) if col.dtype == object else col
    return out


def with_popular(
    ann_ids: np.ndarray,
    ann_scores: np.ndarray,
    popular_ids: np.ndarray,
    exclude: np.ndarray,
    n_popular: int,
    user_vector: np.ndarray,
    embeddings_of: Callable[[np.ndarray], np.ndarray],
    popular_embeddings: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ANN candidates plus up to ``n_popular`` of ``popular_ids`` that are neither
    among them nor in ``exclude``.

    Args:
        popular_ids: item ids, most popular first (only as many of the head as it
            takes to find ``n_popular`` are read).
        exclude: item ids never to add (seen by the user, or excluded by the caller).
        embeddings_of: item ids -> float32 [m, d] embeddings.
        popular_embeddings: optionally the embeddings of the first rows of
            ``popular_ids``, gathered once per artifact set (the serving path: 200
            random rows of a 1M-row memory-mapped file cost more than the rest).

    Returns:
        (ids int64, scores float32, ranks int32): ANN candidates first, in ANN
        order with their ANN rank; then the added popular items, ``NOT_RETRIEVED``.
    """
    ann_ids = np.asarray(ann_ids, np.int64)
    ranks = np.arange(len(ann_ids), dtype=np.int32)
    if n_popular <= 0 or len(popular_ids) == 0:
        return ann_ids, np.asarray(ann_scores, np.float32), ranks
    exclude = np.asarray(exclude, np.int64)
    if len(exclude) > 1 and not (exclude[1:] >= exclude[:-1]).all():
        exclude = np.sort(exclude)
    found = np.sort(ann_ids)
    # At most len(exclude) + len(ann_ids) of the head are dropped, so that many
    # extra always suffice; most users need far fewer: grow the head until it holds
    # n_popular that stay (two sorted lookups per round instead of np.isin's sorts).
    limit = min(len(popular_ids), n_popular + len(exclude) + len(ann_ids))
    take = min(limit, 2 * n_popular + 64)
    while True:
        head = np.asarray(popular_ids[:take], np.int64)
        keep = ~(member(head, exclude) | member(head, found))
        if take >= limit or int(keep.sum()) >= n_popular:
            break
        take = min(limit, 4 * take)
    at = np.flatnonzero(keep)[:n_popular]
    extra = head[at]
    if popular_embeddings is not None and (len(at) == 0 or at[-1] < len(popular_embeddings)):
        emb = popular_embeddings[at]
    else:
        emb = embeddings_of(extra)
    extra_scores = emb @ np.asarray(user_vector, np.float32)
    return (
        np.concatenate([ann_ids, extra]),
        np.concatenate([np.asarray(ann_scores, np.float32), extra_scores.astype(np.float32)]),
        np.concatenate([ranks, np.full(len(extra), NOT_RETRIEVED, np.int32)]),
    )
