"""Co-occurrence neighbours against a plain-Python count of the same pairs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from candidate.neighbours import cooccurrence_neighbours


def test_neighbours_equal_a_plain_count() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for user in range(1, 40):
        items = rng.choice(np.arange(10, 60), int(rng.integers(2, 15)), replace=False)
        rows += [(user, int(i), 4.0, t) for t, i in enumerate(items)]
    train = pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"])
    item_ids = np.arange(10, 70)  # items 60..69 nobody rated
    window, top = 3, 5
    got_rows, got_scores = cooccurrence_neighbours(train, item_ids, window, top)
    pairs: Counter[tuple[int, int]] = Counter()
    for _, g in train.sort_values(["userId", "timestamp"]).groupby("userId"):
        seq = g["movieId"].tolist()
        for i in range(len(seq)):
            for j in range(i + 1, min(i + window + 1, len(seq))):
                pairs[(seq[i], seq[j])] += 1
                pairs[(seq[j], seq[i])] += 1
    freq = train["movieId"].value_counts()
    for r, item in enumerate(item_ids):
        want = {b: n / np.sqrt(freq[a] * freq[b]) for (a, b), n in pairs.items() if a == item}
        best = sorted(want.values(), reverse=True)[:top]
        n = len(best)
        np.testing.assert_allclose(got_scores[r, :n], best, rtol=1e-5)
        assert (got_scores[r, n:] == 0).all() and (got_rows[r, n:] == -1).all()
        for c, s in zip(got_rows[r, :n], got_scores[r, :n], strict=True):
            assert abs(want[int(item_ids[c])] - s) < 1e-5
