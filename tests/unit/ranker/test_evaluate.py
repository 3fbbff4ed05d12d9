from __future__ import annotations

import math

import numpy as np
import pytest

from ranker.evaluate import auc, bootstrap_ci, ndcg_at_k, recall_at_k


def test_ndcg_exact_values() -> None:
    ranked = np.array([5, 1, 7, 3])
    # hits at ranks 2 and 4: (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3))
    want = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(ranked, {1, 3}, 10) == pytest.approx(want)
    assert ndcg_at_k(ranked, {5}, 1) == 1.0
    assert ndcg_at_k(ranked, {99}, 4) == 0.0
    # more relevant items than k: the ideal is k hits
    assert ndcg_at_k(np.array([1, 2]), {1, 2, 3}, 2) == 1.0


def test_recall_exact_values() -> None:
    assert recall_at_k(np.array([1, 2, 3, 4]), {2, 4, 9}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(np.array([1, 2, 3, 4]), {2, 4, 9}, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        recall_at_k(np.array([1]), set(), 1)


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(200), 1)  # many ties
    labels = rng.random(200) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(scores, labels) == pytest.approx(pairwise)
    assert auc(np.array([0.9, 0.1]), np.array([True, False])) == 1.0
    assert math.isnan(auc(np.array([0.5, 0.4]), np.array([False, False])))


def test_bootstrap_interval_contains_the_mean_and_narrows_with_data() -> None:
    rng = np.random.default_rng(1)
    small = rng.normal(0.3, 0.1, 50)
    large = rng.normal(0.3, 0.1, 5000)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 5
    m3, _, _ = bootstrap_ci(np.array([np.nan, 1.0, 3.0]))
    assert m3 == 2.0
