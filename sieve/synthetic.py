"""A seeded synthetic catalog at any size, for 1M-item builds and benchmarks.

Item embeddings are drawn from a mixture of clusters (a few thousand at 1M items)
and L2-normalised, so they behave like text embeddings (items of one topic are
close, topics differ) rather than uniform noise. Users prefer a few clusters and
rate the items they meet there higher. The same arguments give the same catalog,
byte for byte: every draw comes from one ``numpy`` PCG64 stream in a fixed order
and fixed chunk sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sieve.data import GENRES

_CHUNK = 65_536


@dataclass(frozen=True)
class SyntheticCatalog:
    movies: pd.DataFrame  # movieId, title, genres (the MovieLens layout)
    ratings: pd.DataFrame  # userId, movieId, rating, timestamp
    tags: pd.DataFrame  # empty, same columns as MovieLens
    embeddings: np.ndarray  # float32 [n_items, dim], L2-normalised, row i = movies row i
    clusters: np.ndarray  # int32 [n_items], the mixture component of each item


def default_clusters(n_items: int) -> int:
    return int(np.clip(n_items // 250, 16, 4096))


def synthetic_catalog(
    n_items: int,
    n_users: int | None = None,
    dim: int = 384,
    n_clusters: int | None = None,
    seed: int = 0,
) -> SyntheticCatalog:
    """Generate the catalog (see module docstring).

    Args:
        n_items: catalog size (>= 100).
        n_users: defaults to clip(n_items // 100, 200, 20_000).
        dim: embedding dimension.
        n_clusters: defaults to clip(n_items // 250, 16, 4096).
    """
    if n_items < 100:
        raise ValueError(f"n_items must be >= 100, got {n_items}")
    n_users = n_users or int(np.clip(n_items // 100, 200, 20_000))
    n_clusters = n_clusters or default_clusters(n_items)
    rng = np.random.default_rng(seed)

    centers = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    # Topic sizes are skewed, like a real catalog's.
    weights = rng.lognormal(0.0, 1.0, n_clusters)
    weights /= weights.sum()
    clusters = rng.choice(n_clusters, size=n_items, p=weights).astype(np.int32)
    spread = rng.uniform(0.8, 1.4, n_clusters).astype(np.float32)  # cos to center ~0.6-0.8
    emb = np.empty((n_items, dim), dtype=np.float32)
    for lo in range(0, n_items, _CHUNK):
        hi = min(lo + _CHUNK, n_items)
        c = clusters[lo:hi]
        noise = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        noise *= (spread[c] / np.sqrt(np.float32(dim)))[:, None]
        x = centers[c] + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb[lo:hi] = x

    real_genres = np.array(GENRES[:-1])
    cluster_genres = [
        "|".join(sorted(rng.choice(real_genres, size=int(rng.integers(1, 4)), replace=False)))
        for _ in range(n_clusters)
    ]
    movie_ids = np.arange(1, n_items + 1, dtype=np.int64)
    movies = pd.DataFrame(
        {
            "movieId": movie_ids,
            "title": [
                f"Synthetic item {i} (topic {c})" for i, c in zip(movie_ids, clusters, strict=True)
            ],
            "genres": np.array(cluster_genres, dtype=object)[clusters],
        }
    )

    # Interactions: each user prefers 1-3 topics; 80% of what they rate is from
    # those topics (popular items more often), the rest from the whole catalog.
    popularity = rng.pareto(1.5, n_items) + 1.0
    order = np.argsort(clusters, kind="stable")
    starts = np.searchsorted(clusters[order], np.arange(n_clusters + 1))
    quality = rng.normal(0.0, 0.4, n_items).astype(np.float32)
    pop_cdf = np.cumsum(popularity)
    pop_cdf /= pop_cdf[-1]
    users, items, ratings, stamps = [], [], [], []
    for u in range(n_users):
        liked = rng.choice(n_clusters, size=int(rng.integers(1, 4)), replace=False, p=weights)
        n = int(rng.integers(20, 150))
        n_in = int(round(n * 0.8))
        pool = np.concatenate([order[starts[c] : starts[c + 1]] for c in liked])
        if len(pool) == 0:
            pool = order[:1]
        p_in = popularity[pool] / popularity[pool].sum()
        in_cdf = np.cumsum(p_in)
        from_pool = pool[np.minimum(np.searchsorted(in_cdf, rng.random(n_in)), len(pool) - 1)]
        # Inverse-CDF draws: rng.choice(p=...) would rebuild a 1M-entry CDF per user.
        anywhere = np.minimum(np.searchsorted(pop_cdf, rng.random(n - n_in)), n_items - 1)
        chosen = np.concatenate([from_pool, anywhere])
        chosen = np.unique(chosen)
        in_liked = np.isin(clusters[chosen], liked)
        raw = 2.6 + 1.4 * in_liked + quality[chosen] + rng.normal(0, 0.6, len(chosen))
        users.append(np.full(len(chosen), u + 1, dtype=np.int64))
        items.append(chosen.astype(np.int64) + 1)
        ratings.append(np.clip(np.round(raw * 2) / 2, 0.5, 5.0).astype(np.float32))
        stamps.append(1_500_000_000 + np.sort(rng.integers(0, 50_000_000, len(chosen))))
    ratings_df = pd.DataFrame(
        {
            "userId": np.concatenate(users),
            "movieId": np.concatenate(items),
            "rating": np.concatenate(ratings),
            "timestamp": np.concatenate(stamps).astype(np.int64),
        }
    )
    tags = pd.DataFrame(
        {
            "userId": pd.Series([], dtype="int64"),
            "movieId": pd.Series([], dtype="int64"),
            "tag": pd.Series([], dtype="string"),
            "timestamp": pd.Series([], dtype="int64"),
        }
    )
    return SyntheticCatalog(movies, ratings_df, tags, emb, clusters)
