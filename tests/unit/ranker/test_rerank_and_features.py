from __future__ import annotations

import numpy as np
import pytest

from ranker.features import MODEL_FEATURES, assemble
from ranker.rerank import genre_cap


def test_genre_cap_exact() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    groups = np.array([0, 0, 0, 1, 1, 2])
    chosen, relaxed = genre_cap(scores, groups, k=4, cap=2)
    assert chosen.tolist() == [0, 1, 3, 4] and not relaxed


def test_genre_cap_relaxes_instead_of_returning_fewer() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    groups = np.array([0, 0, 0, 0, 1])
    chosen, relaxed = genre_cap(scores, groups, k=4, cap=2)
    assert relaxed and chosen.tolist() == [0, 1, 2, 4]


@pytest.mark.parametrize("seed", range(5))
def test_genre_cap_properties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.random(1000)
    groups = rng.integers(0, 20, 1000)
    chosen, relaxed = genre_cap(scores, groups, k=50, cap=4)
    assert len(set(chosen.tolist())) == 50 and not relaxed
    assert np.bincount(groups[chosen]).max() <= 4
    assert (np.diff(scores[chosen]) <= 0).all()
    # nothing left out beats a chosen item of its own group unless that group is full
    left = np.setdiff1d(np.arange(1000), chosen)
    worst_chosen = scores[chosen].min()
    for i in left[scores[left] > worst_chosen]:
        assert (groups[chosen] == groups[i]).sum() == 4


def test_genre_cap_short_input() -> None:
    chosen, relaxed = genre_cap(np.array([0.1, 0.3]), np.array([0, 0]), k=5, cap=1)
    assert chosen.tolist() == [1, 0] and relaxed
    chosen, _ = genre_cap(np.array([]), np.array([], np.int64), k=5, cap=1)
    assert len(chosen) == 0


def test_assemble_exact_values() -> None:
    x = assemble(
        ann_score=np.array([0.5, 0.25], np.float32),
        user_genre_affinity=np.array([[0.5, 0.5, 0.0]], np.float32),
        item_genres=np.array([[1, 0, 1], [0, 1, 1]], np.float32),
        item_log_popularity=np.array([1.0, 2.0], np.float32),
        item_rating_mean=np.array([4.0, 3.0], np.float32),
        user_rating_count=np.array([3]),
        user_rating_mean=np.array([3.5], np.float32),
    )
    assert x.dtype == np.float32 and x.shape == (2, len(MODEL_FEATURES))
    np.testing.assert_array_equal(x[0], [0.5, 0.5, 1.0, 4.0, np.log1p(np.float32(3)), 3.5, 0.5])
    np.testing.assert_array_equal(x[1], [0.25, 0.5, 2.0, 3.0, np.log1p(np.float32(3)), 3.5, -0.5])
