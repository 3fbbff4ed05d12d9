"""Candidate sources merged with quotas: each source adds up to its quota of items
no earlier source gave, excluded items never come back, and every source that
reached an item is named (checked against a plain-Python oracle)."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.sources import BIT, SOURCES, i2i_scores, merge, source_names


def _oracle(lists, exclude, quotas):  # type: ignore[no-untyped-def]
    """The merge written as the module describes it, one item at a time."""
    out: list[int] = []
    bits: dict[int, int] = {}
    for name in SOURCES:
        quota, added = quotas.get(name, 0), 0
        if quota <= 0:
            continue
        for item in lists[name]:
            if added >= quota:
                break
            if item in exclude:
                continue
            bits[item] = bits.get(item, 0) | int(BIT[name])
            if item not in out:
                out.append(item)
                added += 1
    return out, [bits[i] for i in out]


@pytest.mark.parametrize("seed", range(40))
def test_merge_equals_the_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    exclude = np.sort(rng.choice(np.arange(1, n + 1), int(rng.integers(0, n // 2)), replace=False))
    allowed = np.setdiff1d(np.arange(1, n + 1), exclude)
    learned = rng.permutation(allowed)[: int(rng.integers(0, 60))]
    text = rng.permutation(allowed)[: int(rng.integers(0, 30))]
    i2i_ids = np.sort(
        rng.choice(np.arange(1, n + 1), int(rng.integers(0, min(n, 50))), replace=False)
    )
    i2i_vals = rng.random(len(i2i_ids)).astype(np.float32)
    popular = rng.permutation(np.arange(1, n + 1))
    quotas = {name: int(rng.integers(0, 40)) for name in SOURCES}
    cand = merge(learned, text, (i2i_ids, i2i_vals), popular, exclude, quotas)
    i2i_order = i2i_ids[np.argsort(-i2i_vals, kind="stable")]
    lists = {"learned": learned, "text": text, "i2i": i2i_order, "popular": popular}
    want, want_bits = _oracle(lists, set(exclude.tolist()), quotas)
    assert cand.ids.tolist() == want
    assert cand.sources.tolist() == want_bits
    assert not np.isin(cand.ids, exclude).any()
    n_learned = min(quotas["learned"], len(learned))
    assert cand.learned_rank.tolist() == list(range(n_learned)) + [-1] * (len(want) - n_learned)
    lookup = dict(zip(i2i_ids.tolist(), i2i_vals.tolist(), strict=True))
    np.testing.assert_allclose(cand.i2i_score, [lookup.get(i, 0.0) for i in want], rtol=1e-6)


def test_i2i_scores_sum_recent_neighbours_with_decay() -> None:
    item_ids = np.array([10, 20, 30, 40])
    rows = np.array([[1, 2], [2, -1], [3, -1], [-1, -1]], np.int32)
    scores = np.array([[0.5, 0.25], [1.0, 0.0], [0.3, 0.0], [0.0, 0.0]], np.float32)
    ids, vals = i2i_scores(rows, scores, np.array([0, 1]), item_ids)  # row 1 is the last item
    # item 20 (row 1) from seed row 0: 0.5 * 0.8; item 30 (row 2): 0.25 * 0.8 + 1.0 * 1
    assert ids.tolist() == [20, 30]
    np.testing.assert_allclose(vals, [0.4, 1.2], rtol=1e-6)
    empty = i2i_scores(rows, scores, np.empty(0, np.int64), item_ids)
    assert len(empty[0]) == 0


def test_source_names_in_source_order() -> None:
    assert source_names(int(BIT["popular"] | BIT["learned"])) == ["learned", "popular"]
    assert source_names(0) == []
