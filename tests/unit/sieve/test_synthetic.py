from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from sieve.synthetic import synthetic_catalog


def _digest(c) -> str:  # type: ignore[no-untyped-def]
    h = hashlib.sha256(c.embeddings.tobytes())
    h.update(pd.util.hash_pandas_object(c.movies).to_numpy().tobytes())
    h.update(pd.util.hash_pandas_object(c.ratings).to_numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_bytes() -> None:
    a, b = synthetic_catalog(3000, seed=7), synthetic_catalog(3000, seed=7)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(synthetic_catalog(3000, seed=8))


def test_clustered_normalised_embeddings() -> None:
    c = synthetic_catalog(20_000, dim=64, seed=0)
    assert c.embeddings.dtype == np.float32 and c.embeddings.shape == (20_000, 64)
    np.testing.assert_allclose(np.linalg.norm(c.embeddings, axis=1), 1.0, atol=1e-5)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 20_000, (2, 5000))
    cos = np.einsum("ij,ij->i", c.embeddings[a], c.embeddings[b])
    same = c.clusters[a] == c.clusters[b]
    # items of one topic are close, of different topics about orthogonal
    assert cos[same].mean() > 0.4 and abs(cos[~same].mean()) < 0.05


def test_users_rate_their_topics_higher() -> None:
    c = synthetic_catalog(20_000, seed=0)
    r = c.ratings
    assert r["movieId"].between(1, 20_000).all() and r["userId"].nunique() == 200
    assert not r.duplicated(["userId", "movieId"]).any()
    # each user's most-rated topic is rated higher than the rest
    topic = c.clusters[r["movieId"].to_numpy() - 1]
    main = pd.Series(topic).groupby(r["userId"].to_numpy()).agg(lambda s: s.mode().iloc[0])
    in_main = topic == main.loc[r["userId"]].to_numpy()
    assert r["rating"][in_main].mean() > r["rating"][~in_main].mean() + 0.5
