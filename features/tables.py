"""Offline: the user and item feature tables Feast materializes. Pure pandas/numpy.

Every user feature comes from the training part of the temporal split only, so
the held-out ratings stay unseen by the features, the index and the model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.definitions import HISTORY_YEARS, ITEM_VIEW, USER_VIEW
from sieve.data import GENRE_INDEX, genre_multi_hot

SECONDS_PER_YEAR = 365.25 * 86400
RATING_PRIOR_WEIGHT = 5.0
"""Item rating means shrink toward the global mean as if from this many ratings."""


def cutoff_of(train: pd.DataFrame) -> float:
    """The training cut-off, the latest rating's time: the "now" of every age,
    rating history and idle time in both tables."""
    return float(train["timestamp"].max()) if len(train) else 0.0


def item_table(movies: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """One row per movie (in ``movies`` order) with the ``ITEM_VIEW`` features."""
    stats = train.groupby("movieId").agg(
        size=("rating", "size"), sum=("rating", "sum"), first=("timestamp", "min")
    )
    count = movies["movieId"].map(stats["size"]).fillna(0).to_numpy(np.float64)
    total = movies["movieId"].map(stats["sum"]).fillna(0).to_numpy(np.float64)
    global_mean = float(train["rating"].mean()) if len(train) else 3.5
    shrunk = (total + RATING_PRIOR_WEIGHT * global_mean) / (count + RATING_PRIOR_WEIGHT)
    cutoff = cutoff_of(train)
    first_rated = movies["movieId"].map(stats["first"]).to_numpy(np.float64)
    # years on the platform at the cut-off; an item nobody rated yet is new (0)
    age = np.nan_to_num((cutoff - first_rated) / SECONDS_PER_YEAR, nan=0.0)
    genres = genre_multi_hot(movies["genres"])
    history = rating_history(movies["movieId"], train, cutoff)
    first = movies["genres"].fillna("").str.split("|").str[0]
    primary = first.map(GENRE_INDEX).fillna(GENRE_INDEX["(no genres listed)"])
    frame = pd.DataFrame(
        {
            ITEM_VIEW.join_key: movies["movieId"].to_numpy(np.int64),
            "genres": list(genres),
            "primary_genre": primary.to_numpy(np.int64),
            "log_popularity": np.log1p(count).astype(np.float32),
            "rating_mean": shrunk.astype(np.float32),
            "age_years": age.astype(np.float32),
            "rating_history": list(history),
        }
    )
    return frame


def rating_history(item_ids: pd.Series, train: pd.DataFrame, cutoff: float) -> np.ndarray:
    """float32 [len(item_ids), HISTORY_YEARS]: each item's ratings per year before
    ``cutoff`` (bin 0 the last year, the last bin everything older).

    With the user's ``idle_years`` it places an item in the user's time: what was
    popular when the user was last active, which popularity at the cut-off misses
    for the many users whose ratings stop years before it.
    """
    row_of = pd.Series(np.arange(len(item_ids)), index=item_ids.to_numpy())
    rated = train["movieId"].isin(row_of.index).to_numpy()
    rows = row_of.loc[train["movieId"].to_numpy()[rated]].to_numpy()
    years = (cutoff - train["timestamp"].to_numpy(np.float64)[rated]) / SECONDS_PER_YEAR
    bins = np.clip(years.astype(np.int64), 0, HISTORY_YEARS - 1)
    counts = np.bincount(rows * HISTORY_YEARS + bins, minlength=len(item_ids) * HISTORY_YEARS)
    return counts.reshape(len(item_ids), HISTORY_YEARS).astype(np.float32)


def user_table(
    train: pd.DataFrame,
    movies: pd.DataFrame,
    embeddings: np.ndarray,
    positive_rating: float,
    n_recent: int = 50,
    learned: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per user in ``train`` with the ``USER_VIEW`` features.

    ``text_vector`` is the L2-normalised mean text embedding of the user's
    positively rated items (all rated items when none is positive);
    ``recent_item_ids`` the last ``n_recent`` rated items, oldest first;
    ``user_vector`` the learned one of ``learned`` ((user ids, vectors), e.g. the
    two towers'; zeros for a user it lacks, or of the text's dimension when
    ``learned`` is None); ``genre_affinity`` is the
    share of those items in each genre; ``idle_years`` the time from the user's
    last rating to the cut-off (the latest rating in ``train``), the cut-off of
    ``item_table``'s ages and histories.
    """
    cutoff = cutoff_of(train)
    row_of = pd.Series(np.arange(len(movies)), index=movies["movieId"].to_numpy())
    genres = genre_multi_hot(movies["genres"])
    users, vectors, affinities, counts, means, stds, idle, seen = [], [], [], [], [], [], [], []
    recent = []
    ordered = train.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    for user_id, group in ordered.groupby("userId", sort=True):
        rows = row_of.loc[group["movieId"].to_numpy()].to_numpy()
        liked = rows[group["rating"].to_numpy() >= positive_rating]
        basis = liked if len(liked) else rows
        v = embeddings[basis].mean(axis=0)
        vectors.append((v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32))
        g = genres[basis].sum(axis=0)
        affinities.append((g / max(float(g.sum()), 1.0)).astype(np.float32))
        users.append(int(user_id))
        counts.append(len(group))
        means.append(float(group["rating"].mean()))
        stds.append(float(group["rating"].std(ddof=0)))
        idle.append((cutoff - float(group["timestamp"].max())) / SECONDS_PER_YEAR)
        seen.append(np.sort(group["movieId"].to_numpy(np.int64)))
        recent.append(group["movieId"].to_numpy(np.int64)[-n_recent:] if n_recent else [])
    user_ids = np.asarray(users, np.int64)
    if learned is None:
        learned_vectors = list(np.zeros((len(users), embeddings.shape[1]), np.float32))
    else:
        at = pd.Series(np.arange(len(learned[0])), index=learned[0])
        pos = at.reindex(user_ids).to_numpy()
        dim = learned[1].shape[1]
        learned_vectors = [learned[1][int(p)] if p == p else np.zeros(dim, np.float32) for p in pos]
    return pd.DataFrame(
        {
            USER_VIEW.join_key: user_ids,
            "user_vector": learned_vectors,
            "text_vector": vectors,
            "genre_affinity": affinities,
            "rating_count": np.asarray(counts, np.int64),
            "rating_mean": np.asarray(means, np.float32),
            "rating_std": np.asarray(stds, np.float32),
            "idle_years": np.asarray(idle, np.float32),
            "seen_item_ids": seen,
            "recent_item_ids": [np.asarray(r, np.int64) for r in recent],
        }
    )
