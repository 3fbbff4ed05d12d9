"""The learned retriever trained for real on a small synthetic catalog whose users
prefer a few topics: it must find what users rate next far better than chance,
give items nobody rated a vector from their text, and export a user tower that
ONNX Runtime runs as torch does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")

from candidate.towers import (  # noqa: E402
    HISTORY_INPUT,
    MASK_INPUT,
    USER_OUTPUT,
    TowerSpec,
    export_user_tower,
    history_inputs,
    sequences,
    train_towers,
)
from sieve.data import genre_multi_hot, temporal_split  # noqa: E402
from sieve.synthetic import synthetic_catalog  # noqa: E402

SPEC = TowerSpec(
    dim=16, history=10, epochs=20, hidden=64, batch_size=256, target_rating=3.5, seed=0
)


@pytest.fixture(scope="module")
def trained():  # type: ignore[no-untyped-def]
    cat = synthetic_catalog(3000, n_users=300, dim=32, seed=1)
    train, hold = temporal_split(cat.ratings, 0.2)
    ids = cat.movies["movieId"].to_numpy(np.int64)
    towers = train_towers(train, ids, cat.embeddings, genre_multi_hot(cat.movies["genres"]), SPEC)
    return cat, train, hold, ids, towers


def test_vectors_are_unit_and_cover_every_item(trained) -> None:  # type: ignore[no-untyped-def]
    cat, train, _, ids, t = trained
    assert t.item_vectors.shape == (len(ids), SPEC.dim)
    np.testing.assert_allclose(np.linalg.norm(t.item_vectors, axis=1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(t.user_vectors, axis=1), 1.0, rtol=1e-4)
    assert t.user_ids.tolist() == sorted(train["userId"].unique().tolist())
    # items nobody rated get their vector from text, genres and popularity: items
    # of one topic land closer to each other than to another topic's
    cold = np.flatnonzero(~np.isin(ids, train["movieId"].to_numpy()))
    assert len(cold) > 100
    v, c = t.item_vectors[cold], cat.clusters[cold]
    same = c[:, None] == c[None, :]
    sims = v @ v.T
    off = ~np.eye(len(cold), dtype=bool)
    assert sims[same & off].mean() > sims[~same].mean() + 0.2


def test_retrieves_what_users_rate_next_better_than_text(trained) -> None:  # type: ignore[no-untyped-def]
    """Recall@100 of the held-out ratings: the learned space against chance and
    against the text space's mean-of-history user vector (seen items excluded)."""
    cat, train, hold, ids, t = trained
    k = 100
    row = pd.Series(np.arange(len(ids)), index=ids)
    seen = train.groupby("userId")["movieId"].apply(lambda s: row.loc[s.to_numpy()].to_numpy())
    later = hold.groupby("userId")["movieId"].apply(lambda s: s.to_numpy())

    def recall(users: np.ndarray, items: np.ndarray) -> float:
        hits = 0
        for i, user in enumerate(t.user_ids):
            s = items @ users[i]
            s[seen[user]] = -np.inf
            hits += int(np.isin(later[user], ids[np.argpartition(-s, k)[:k]]).sum())
        return hits / sum(len(later[u]) for u in t.user_ids)

    learned = recall(t.user_vectors, t.item_vectors)
    text_users = np.stack([cat.embeddings[seen[u]].mean(axis=0) for u in t.user_ids])
    text = recall(text_users, cat.embeddings)
    assert learned > 3 * k / len(ids), learned  # chance is k / n_items
    assert learned > 1.3 * text, (learned, text)  # 0.153 vs 0.086 when written


def test_user_tower_in_onnx_equals_torch_and_follows_the_history(  # type: ignore[no-untyped-def]
    trained, tmp_path: Path
) -> None:
    import onnxruntime as ort

    _, train, _, ids, t = trained
    path = tmp_path / "user_tower.onnx"
    assert export_user_tower(t.model, SPEC, path) < 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    row = pd.Series(np.arange(len(ids)), index=ids)
    seqs = sequences(train)
    user = int(t.user_ids[0])
    rows = row.loc[seqs[user][0]].to_numpy()
    h, m = history_inputs(t.item_vectors, [rows], SPEC.history)
    got = sess.run([USER_OUTPUT], {HISTORY_INPUT: h, MASK_INPUT: m})[0][0]
    np.testing.assert_allclose(got, t.user_vectors[0], atol=1e-5)
    # one more item in the history moves the vector
    h2, m2 = history_inputs(t.item_vectors, [np.r_[rows, (rows[-1] + 1) % len(ids)]], SPEC.history)
    moved = sess.run([USER_OUTPUT], {HISTORY_INPUT: h2, MASK_INPUT: m2})[0][0]
    assert float(np.abs(moved - got).max()) > 1e-3
