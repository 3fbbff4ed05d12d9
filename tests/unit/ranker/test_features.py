from __future__ import annotations

import numpy as np
import pytest

from features.definitions import HISTORY_YEARS
from ranker.features import MODEL_FEATURES, NOT_RETRIEVED, assemble, with_popular
from sieve.data import GENRES


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
    )
    assert x.dtype == np.float32 and x.shape == (2, len(MODEL_FEATURES))
    col = {name: x[:, j] for j, name in enumerate(MODEL_FEATURES)}
    np.testing.assert_array_equal(col["ann_score"], [0.5, 0.25])
    np.testing.assert_allclose(col["log_candidate_rank"], [0.0, np.log1p(2048)], rtol=1e-6)
    np.testing.assert_array_equal(col["from_ann"], [1, 0])
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
        x = assemble(np.array([0.1], np.float32), np.array([0]), user, item)
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
        np.testing.assert_allclose(
            assemble(scores, ranks, one, item), assemble(scores, ranks, per_row, item), rtol=1e-6
        )


def test_with_popular_adds_only_what_the_search_missed() -> None:
    emb = np.eye(6, dtype=np.float32)
    user = np.arange(6, dtype=np.float32)
    ids, scores, ranks = with_popular(
        np.array([10, 12]),
        np.array([0.9, 0.8], np.float32),
        np.array([12, 13, 14, 15]),
        np.array([11]),  # excluded
        2,
        user,
        lambda i: emb[np.asarray(i) - 10],
    )
    assert ids.tolist() == [10, 12, 13, 14]
    assert ranks.tolist() == [0, 1, NOT_RETRIEVED, NOT_RETRIEVED]
    np.testing.assert_allclose(scores, [0.9, 0.8, 3.0, 4.0], rtol=1e-6)  # user . embedding
    # popular items the search found do not use up the popular slots: with the
    # two most popular both retrieved, the next two unseen ones are added
    ids, _, _ = with_popular(
        np.array([10, 12]),
        np.array([0.9, 0.8], np.float32),
        np.array([12, 10, 11, 13, 14, 15]),
        np.array([11]),
        2,
        user,
        lambda i: emb[np.asarray(i) - 10],
    )
    assert ids.tolist() == [10, 12, 13, 14]
    same = with_popular(
        np.array([1]),
        np.array([0.1], np.float32),
        np.array([2]),
        np.array([], np.int64),
        0,
        user,
        None,  # type: ignore[arg-type]
    )
    assert same[0].tolist() == [1]


def _with_popular_by_isin(ann_ids, popular_ids, exclude, n_popular):  # type: ignore[no-untyped-def]
    """The first version: one np.isin over the whole head that could be needed."""
    head = popular_ids[: n_popular + len(exclude) + len(ann_ids)]
    return head[~np.isin(head, exclude) & ~np.isin(head, ann_ids)][:n_popular]


@pytest.mark.parametrize("seed", range(30))
def test_with_popular_equals_the_isin_version(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(50, 3000))
    emb = rng.normal(size=(n_items, 8)).astype(np.float32)
    popular = rng.permutation(n_items).astype(np.int64)
    # heavy users: most of the popular head seen, so the head must grow
    n_seen = int(rng.integers(0, n_items // 2 + 1))
    seen = popular[:n_seen] if seed % 3 == 0 else rng.choice(n_items, n_seen, replace=False)
    exclude = np.asarray(seen, np.int64) if seed % 2 else np.sort(seen).astype(np.int64)
    ann = rng.choice(np.setdiff1d(np.arange(n_items), exclude), min(40, n_items - n_seen),
                     replace=False)  # fmt: skip
    n_popular = int(rng.integers(0, 60))
    user = rng.normal(size=8).astype(np.float32)
    head_len = int(rng.integers(0, n_items))
    for head in (None, emb[popular[:head_len]]):
        ids, scores, ranks = with_popular(
            ann, rng.random(len(ann)).astype(np.float32), popular, exclude, n_popular, user,
            lambda i: emb[np.asarray(i)], head,
        )  # fmt: skip
        want = _with_popular_by_isin(ann, popular, exclude, n_popular) if n_popular else []
        assert ids[len(ann) :].tolist() == list(want)
        np.testing.assert_allclose(scores[len(ann) :], emb[want] @ user, rtol=1e-5, atol=1e-5)
        assert (ranks[len(ann) :] == NOT_RETRIEVED).all()
