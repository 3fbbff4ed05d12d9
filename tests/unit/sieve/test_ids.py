"""IdIndex against a dict (the oracle), on both of its layouts."""

from __future__ import annotations

import numpy as np
import pytest

from sieve.ids import IdIndex


@pytest.mark.parametrize(
    "ids",
    [
        np.arange(1, 1001, dtype=np.int64) * 7,  # dense table
        np.array([5, 2, 9, 1 << 40, 3], np.int64),  # a huge id: sorted search
        np.array([4, -3, 8], np.int64),  # a negative id: sorted search
        np.array([], np.int64),
    ],
)
def test_rows_equal_a_dict_lookup(ids: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(ids)
    index = IdIndex(shuffled)
    oracle = {int(i): r for r, i in enumerate(shuffled)}
    queries = np.concatenate([shuffled, [0, -1, 6, 1 << 41, 10**6]]).astype(np.int64)
    rows, found = index.rows(queries)
    for q, r, f in zip(queries.tolist(), rows.tolist(), found.tolist(), strict=True):
        assert f == (q in oracle)
        assert r == oracle.get(q, 0)
