"""The ranking model's input row, assembled from user, item and candidate features.

Pure numpy, used by training (many users at once), serving (one user, ~1200
candidates) and the quality report, so the model sees the same features in all
three places. The column list is versioned with the model in the manifest.

Candidates come from four sources (``ranker/sources.py``); the model sees which
gave each item, its learned score and rank, its text score, its co-occurrence
with the user's last items and its learned similarity to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sieve.data import GENRES

NOT_RETRIEVED = -1
"""Candidate rank of an item that came from the popular source, not the ANN search."""
_RANK_OF_MISSING = 2048.0  # past any ANN rank (k <= 2048)

CROSS = (
    "ann_score",  # learned user vector . learned item vector
    "log_candidate_rank",  # log1p of the learned ANN rank; log1p(2048) when not retrieved
    "from_ann",  # 1 if the learned ANN search gave the item
    # the other candidate sources (ranker/sources.py) and their signals
    "from_text",  # the text ANN gave it
    "from_i2i",  # the item-to-item source gave it
    "from_popular",  # the popular source gave it
    "i2i_score",  # co-occurrence with the user's last items (0: none)
    "text_score",  # user text vector . item text embedding
    "recent_sim_max",  # largest learned cosine to the user's last items
    "recent_sim_mean",  # their mean
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


SOURCE_COLUMNS = CROSS[3:10]
"""The columns ``source_inputs`` computes, in ``CROSS`` order."""
RECENT_SIM_ITEMS = 10
"""``recent_sim_*`` compare a candidate with the user's last this-many items."""


def source_inputs(
    sources: np.ndarray,
    i2i_score: np.ndarray,
    item_vectors: np.ndarray,
    user_vector: np.ndarray,
    text_embeddings: np.ndarray,
    text_vector: np.ndarray,
    recent_vectors: np.ndarray,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(ann_score [n], the ``SOURCE_COLUMNS``) of one user's n candidates.

    Args:
        sources: uint8 [n], the candidates' source bits (``ranker.sources.BIT``).
        item_vectors: [n, d] the candidates' learned vectors; ``user_vector`` [d].
        text_embeddings: [n, 384] their text embeddings; ``text_vector`` [384].
        recent_vectors: [m, d] learned vectors of the user's last items (m may be 0).
    """
    from ranker.sources import BIT

    ann = item_vectors @ np.asarray(user_vector, np.float32)
    recent = np.asarray(recent_vectors, np.float32)[-RECENT_SIM_ITEMS:]
    if len(recent):
        sims = item_vectors @ recent.T
        sim_max, sim_mean = sims.max(axis=1), sims.mean(axis=1)
    else:
        sim_max = sim_mean = np.zeros(len(item_vectors), np.float32)
    return ann.astype(np.float32), {
        "from_text": (sources & BIT["text"]) > 0,
        "from_i2i": (sources & BIT["i2i"]) > 0,
        "from_popular": (sources & BIT["popular"]) > 0,
        "i2i_score": i2i_score,
        "text_score": text_embeddings @ np.asarray(text_vector, np.float32),
        "recent_sim_max": sim_max,
        "recent_sim_mean": sim_mean,
    }


def assemble(
    ann_score: np.ndarray,
    candidate_rank: np.ndarray,
    user: Mapping[str, np.ndarray],
    item: Mapping[str, np.ndarray],
    extra: Mapping[str, np.ndarray],
) -> np.ndarray:
    """Model input rows, float32 [n, len(MODEL_FEATURES)].

    Args:
        ann_score: [n] learned user vector . item vector.
        candidate_rank: [n] learned ANN rank, or ``NOT_RETRIEVED``.
        extra: the ``SOURCE_COLUMNS`` ([n] each, ``source_inputs``).
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
    j = 3 + len(SOURCE_COLUMNS)
    out[:, j] = match
    out[:, j + 1] = match / np.maximum(norms, 1e-6)
    out[:, j + 2] = item_mean - user_mean
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
    for j, name in enumerate(SOURCE_COLUMNS, start=3):
        out[:, j] = extra[name]
    j = 3 + len(SOURCE_COLUMNS)
    out[:, j + 3] = np.log1p(era)
    out[:, j + 4] = by_then / np.maximum(history.sum(axis=1), 1.0)
    out[:, j + 5] = np.asarray(item["age_years"], np.float32) - idle
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
