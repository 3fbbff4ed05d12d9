"""Distillation's listwise term and its batches of whole users (torch, small data)."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.train import _epochs, _listwise_kl, fit, predict, student_mlp

N_USERS, PER_USER, N_FEATURES = 40, 50, 6


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_USERS * PER_USER, N_FEATURES)).astype(np.float32)
    teacher = (x @ rng.normal(size=N_FEATURES) + 2 * x[:, 0] * x[:, 1]).astype(np.float32)
    group = np.repeat(np.arange(N_USERS), PER_USER)
    return x, teacher, group


def test_listwise_kl_matches_numpy_and_ignores_a_shift_per_user() -> None:
    import torch

    rng = np.random.default_rng(1)
    s, t = rng.normal(size=7), rng.normal(size=7)
    sizes = [3, 4]

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        p = np.exp(b - b.max()) / np.exp(b - b.max()).sum()
        q = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        return float((p * np.log(p / q)).sum())

    got = float(_listwise_kl(torch.tensor(s), torch.tensor(t), sizes))
    want = (kl(s[:3], t[:3]) + kl(s[3:], t[3:])) / 2
    assert got == pytest.approx(want, rel=1e-9)
    shifted = t + np.r_[np.full(3, 5.0), np.full(4, -2.0)]
    assert float(_listwise_kl(torch.tensor(shifted), torch.tensor(t), sizes)) == pytest.approx(
        0.0, abs=1e-12
    )


def test_user_batches_hold_whole_users_and_cover_every_row_each_epoch() -> None:
    group = np.repeat([7, 3, 9, 4, 5], [2, 3, 1, 4, 2])
    n_batches, next_epoch = _epochs(len(group), 2048, group, 2, seed=0)
    assert n_batches == 3
    orders = []
    for _ in range(2):
        batches = next_epoch()
        assert len(batches) == n_batches
        rows = np.concatenate([idx.numpy() for idx, _ in batches])
        assert np.array_equal(np.sort(rows), np.arange(len(group)))
        for idx, sizes in batches:
            runs = np.split(group[idx.numpy()], np.cumsum(sizes)[:-1])
            assert all(len(set(r)) == 1 and len(r) == (group == r[0]).sum() for r in runs)
        orders.append(rows)
    assert not np.array_equal(orders[0], orders[1])  # users reshuffled each epoch


def test_fit_refuses_what_the_listwise_term_cannot_use() -> None:
    x, teacher, group = _data()
    model = student_mlp(N_FEATURES, (8,), x.mean(0), x.std(0))
    y = np.zeros(len(x), np.float32)
    with pytest.raises(ValueError, match="teacher's logits"):
        fit(model, x, y, 1, 0, group=group, list_weight=1.0)
    interleaved = np.tile(np.arange(N_USERS), PER_USER)
    with pytest.raises(ValueError, match="contiguous"):
        fit(model, x, y, 1, 0, soft=teacher, group=interleaved, list_weight=1.0)


def _agreement(student: np.ndarray, teacher: np.ndarray, k: int = 5) -> float:
    """Mean share of each user's teacher top-k in the student's top-k."""
    shares = []
    for lo in range(0, len(teacher), PER_USER):
        s, t = student[lo : lo + PER_USER], teacher[lo : lo + PER_USER]
        shares.append(len(set(np.argsort(-s)[:k]) & set(np.argsort(-t)[:k])) / k)
    return float(np.mean(shares))


def test_the_listwise_term_alone_teaches_each_users_order() -> None:
    """Labels all 0 and no logit matching (alpha 1 with no MSE is not possible, so
    alpha 0): only the listwise term knows the teacher, and the student's top 5 per
    user must follow it; without the term it is chance (5/50 expected)."""
    x, teacher, group = _data()
    y = np.zeros(len(x), np.float32)
    scores = {}
    for weight in (0.0, 5.0):
        model = student_mlp(N_FEATURES, (32, 16), x.mean(0), x.std(0))
        fit(model, x, y, 30, 0, soft=teacher, alpha=0.0, group=group, list_weight=weight)
        scores[weight] = _agreement(predict(model, x, logits=True), teacher)
    assert scores[5.0] >= 0.7, scores
    assert scores[0.0] <= 0.3, scores
