from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from candidate.embed import DIM, EmbeddingCache, item_texts


def test_cache_round_trips_keys_ending_in_nul(tmp_path: Path) -> None:
    """SHA-256 digests that end in 0x00 (1 in 256) must survive save and load."""
    texts = [f"text {i}" for i in range(2000)]
    assert any(EmbeddingCache.key(t).endswith(b"\x00") for t in texts)
    cache = EmbeddingCache(tmp_path / "c.npz")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(texts), DIM)).astype(np.float32)
    for t, v in zip(texts, vectors, strict=True):
        cache.put(t, v)
    cache.save()
    again = EmbeddingCache(tmp_path / "c.npz")
    again.load()
    for t, v in zip(texts, vectors, strict=True):
        got = again.get(t)
        assert got is not None, t
        np.testing.assert_array_equal(got, v)


def test_item_texts_use_title_genres_and_top_tags() -> None:
    movies = pd.DataFrame(
        {
            "movieId": [1, 2],
            "title": ["A (1999)", "B (2001)"],
            "genres": ["Drama|War", "(no genres listed)"],
        }
    )
    tags = pd.DataFrame(
        {
            "userId": [1, 2, 3, 4],
            "movieId": [1, 1, 1, 1],
            "tag": ["Epic", "epic", "long", "dark"],
            "timestamp": [0, 0, 0, 0],
        }
    )
    t = item_texts(movies, tags, top_tags=2)
    assert t == ["A (1999). Genres: Drama, War. Tags: epic, dark.", "B (2001). Genres: unknown."]
