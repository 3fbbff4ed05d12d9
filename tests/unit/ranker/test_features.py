from __future__ import annotations

import numpy as np
import pytest

from features.definitions import HISTORY_YEARS
from ranker.features import (
    MODEL_FEATURES,
    NOT_RETRIEVED,
    SOURCE_COLUMNS,
    assemble,
    source_inputs,
)
from ranker.sources import BIT
from sieve.data import GENRES


def _no_sources(n: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(n, np.float32) for name in SOURCE_COLUMNS}


def test_assemble_exact_values() -> None:
    g = len(GENRES)
    aff = np.zeros((1, g), np.float32)
    aff[0, :2] = 0.5
    genres = np.zeros((2, g), np.float32)
    genres[0, [0, 2]] = 1
    genres[1, [1, 2]] = 1
    history = np.zeros((2, HISTORY_YEARS), np.float32)
    history[0, [0, 1, 2, -1]] = [5, 3, 2, 4]
    history[1, 0] = 1
    x = assemble(
        np.array([0.5, 0.25], np.float32),
        np.array([0, NOT_RETRIEVED]),
        {
            "genre_affinity": aff,
            "rating_count": np.array([3]),
            "rating_mean": np.array([3.5], np.float32),
            "rating_std": np.array([0.75], np.float32),
            "idle_years": np.array([1.5], np.float32),
        },
        {
            "genres": genres,
            "log_popularity": np.array([1.0, 2.0], np.float32),
            "rating_mean": np.array([4.0, 3.0], np.float32),
            "age_years": np.array([10.0, 0.5], np.float32),
            "rating_history": history,
        },
        {**_no_sources(2), "from_text": np.array([0, 1]), "i2i_score": np.array([0.0, 2.5])},
    )
    assert x.dtype == np.float32 and x.shape == (2, len(MODEL_FEATURES))
    col = {name: x[:, j] for j, name in enumerate(MODEL_FEATURES)}
    np.testing.assert_array_equal(col["ann_score"], [0.5, 0.25])
    np.testing.assert_allclose(col["log_candidate_rank"], [0.0, np.log1p(2048)], rtol=1e-6)
    np.testing.assert_array_equal(col["from_ann"], [1, 0])
    np.testing.assert_array_equal(col["from_text"], [0, 1])
    np.testing.assert_array_equal(col["i2i_score"], [0.0, 2.5])
    np.testing.assert_array_equal(col["genre_match"], [0.5, 0.5])
    # cosine: 0.5 / (|aff| = 0.7071 * |genres| = 1.4142) = 0.5
    np.testing.assert_allclose(col["genre_cosine"], [0.5, 0.5], rtol=1e-5)
    np.testing.assert_array_equal(col["rating_gap"], [0.5, -0.5])
    np.testing.assert_array_equal(col["item_age_years"], [10.0, 0.5])
    # the user's last rating was 1.5 years before the cut-off: year bin 1 (and 2 before it)
    np.testing.assert_allclose(col["era_log_popularity"], [np.log1p(3 + 2), 0.0], rtol=1e-6)
    np.testing.assert_allclose(col["era_share_rated"], [(3 + 2 + 4) / 14, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(col["era_age_years"], [8.5, -1.0])
    np.testing.assert_array_equal(col["item_genre=Action"], [1, 0])
    np.testing.assert_array_equal(col["user_genre=Adventure"], [0.5, 0.5])
    np.testing.assert_allclose(col["user_log_rating_count"], np.log1p(3), rtol=1e-6)
    np.testing.assert_array_equal(col["user_rating_std"], [0.75, 0.75])


def test_era_features_of_a_user_idle_past_the_history() -> None:
    """Idle longer than the history: the oldest bin (everything older) stands for
    the user's year, with nothing before it; NaN idle time counts as now."""
    g = len(GENRES)
    history = np.zeros((1, HISTORY_YEARS), np.float32)
    history[0, [0, -2, -1]] = [7, 2, 3]
    item = {
        "genres": np.zeros((1, g), np.float32),
        "log_popularity": np.array([1.0], np.float32),
        "rating_mean": np.array([3.0], np.float32),
        "age_years": np.array([30.0], np.float32),
        "rating_history": history,
    }

    def era(idle: float) -> dict[str, float]:
        user = {
            "genre_affinity": np.zeros((1, g), np.float32),
            "rating_count": np.array([1]),
            "rating_mean": np.array([3.0], np.float32),
            "rating_std": np.array([0.0], np.float32),
            "idle_years": np.array([idle], np.float32),
        }
        x = assemble(np.array([0.1], np.float32), np.array([0]), user, item, _no_sources(1))
        return {n: float(x[0, j]) for j, n in enumerate(MODEL_FEATURES) if n.startswith("era_")}

    old = era(40.0)
    assert old["era_log_popularity"] == pytest.approx(np.log1p(3))
    assert old["era_share_rated"] == pytest.approx(3 / 12)
    assert old["era_age_years"] == pytest.approx(-10.0)
    now = era(float("nan"))
    assert now["era_log_popularity"] == pytest.approx(np.log1p(7 + 0))
    assert now["era_share_rated"] == pytest.approx(1.0)
    assert np.isnan(now["era_age_years"])  # the scorer puts its default in


def test_one_user_broadcast_equals_a_user_per_row() -> None:
    """Serving passes one user row for all candidates, training a user per row:
    both paths must give the same features."""
    rng = np.random.default_rng(3)
    n, g = 50, len(GENRES)
    history = rng.poisson(0.5, (n, HISTORY_YEARS)).astype(np.float32)
    item = {
        "genres": (rng.random((n, g)) < 0.2).astype(np.float32),
        "log_popularity": rng.random(n).astype(np.float32),
        "rating_mean": rng.random(n).astype(np.float32),
        "age_years": 10 * rng.random(n).astype(np.float32),
        "rating_history": history,
    }
    scores, ranks = rng.random(n).astype(np.float32), np.arange(n)
    for idle in (0.0, 2.7, float(HISTORY_YEARS) - 0.5, 99.0):
        one = {
            "genre_affinity": rng.random((1, g)).astype(np.float32),
            "rating_count": np.array([12]),
            "rating_mean": np.array([3.2], np.float32),
            "rating_std": np.array([0.9], np.float32),
            "idle_years": np.array([idle], np.float32),
        }
        per_row = {k: np.repeat(v, n, axis=0) for k, v in one.items()}
        extra = _no_sources(n)
        np.testing.assert_allclose(
            assemble(scores, ranks, one, item, extra),
            assemble(scores, ranks, per_row, item, extra),
            rtol=1e-6,
        )


def test_source_inputs_exact_values() -> None:
    items = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)  # learned vectors
    text = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    recent = np.array([[1, 0], [0, 1]], np.float32)
    sources = np.array([BIT["learned"], BIT["text"] | BIT["i2i"], BIT["popular"]], np.uint8)
    ann, extra = source_inputs(
        sources,
        np.array([0.0, 1.5, 0.0], np.float32),
        items,
        np.array([0.0, 1.0], np.float32),
        text,
        np.array([0.5, 0.25, 0.0], np.float32),
        recent,
    )
    np.testing.assert_allclose(ann, [0.0, 1.0, 0.8])
    assert extra["from_text"].tolist() == [False, True, False]
    assert extra["from_i2i"].tolist() == [False, True, False]
    assert extra["from_popular"].tolist() == [False, False, True]
    np.testing.assert_allclose(extra["text_score"], [0.5, 0.25, 0.0])
    np.testing.assert_allclose(extra["recent_sim_max"], [1.0, 1.0, 0.8])
    np.testing.assert_allclose(extra["recent_sim_mean"], [0.5, 0.5, 0.7])
    # no recent items: the similarities are 0, not NaN
    _, none = source_inputs(sources, np.zeros(3, np.float32), items, np.ones(2), text,
                            np.ones(3), np.empty((0, 2), np.float32))  # fmt: skip
    assert none["recent_sim_max"].tolist() == [0, 0, 0]
