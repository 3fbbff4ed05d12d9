"""The ranking model's input row, assembled from user, item and candidate features.

Pure numpy, used both by training (many users at once) and by serving (one user,
1000 candidates), so the model sees the same features in both places.
"""

from __future__ import annotations

import numpy as np

MODEL_FEATURES: tuple[str, ...] = (
    "ann_score",  # inner product of user vector and item embedding
    "genre_match",  # user's genre affinity . item's genre multi-hot
    "item_log_popularity",
    "item_rating_mean",
    "user_log_rating_count",
    "user_rating_mean",
    "rating_gap",  # item_rating_mean - user_rating_mean
)
"""Column order of the model's ``features`` input; versioned in the manifest."""


def assemble(
    ann_score: np.ndarray,
    user_genre_affinity: np.ndarray,
    item_genres: np.ndarray,
    item_log_popularity: np.ndarray,
    item_rating_mean: np.ndarray,
    user_rating_count: np.ndarray,
    user_rating_mean: np.ndarray,
) -> np.ndarray:
    """Model input rows, float32 [n, len(MODEL_FEATURES)].

    Item arguments have n rows; user arguments have n rows or one (broadcast).

    Args:
        ann_score: [n] candidate scores.
        user_genre_affinity: [n or 1, G]; item_genres: [n, G].
        item_log_popularity, item_rating_mean: [n].
        user_rating_count, user_rating_mean: [n] or [1].
    """
    item_rating_mean = np.asarray(item_rating_mean, np.float32)
    user_rating_mean = np.asarray(user_rating_mean, np.float32)
    n = len(ann_score)
    out = np.empty((n, len(MODEL_FEATURES)), dtype=np.float32)
    out[:, 0] = ann_score
    out[:, 1] = np.einsum(
        "ij,ij->i", np.broadcast_to(user_genre_affinity, item_genres.shape), item_genres
    )
    out[:, 2] = item_log_popularity
    out[:, 3] = item_rating_mean
    out[:, 4] = np.log1p(np.asarray(user_rating_count, np.float32))
    out[:, 5] = user_rating_mean
    out[:, 6] = item_rating_mean - user_rating_mean
    return out
