"""Offline: item-to-item neighbours from co-occurrence in the users' histories.

Two items co-occur when one user rated both within ``window`` ratings of each
other (a session's items, rather than a whole history's). The score of the pair
is the count over sqrt(count_a * count_b) (cosine of the co-occurrence vectors),
so a popular item does not neighbour everything. Each item keeps its ``top``
best neighbours; the ranker's item-to-item source sums them over the user's
last items (``ranker/sources.py``). Sparse: cost grows with ratings x window,
not with items squared.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def cooccurrence_neighbours(
    train: pd.DataFrame, item_ids: np.ndarray, window: int = 10, top: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour rows int32 [n_items, top], scores float32 [n_items, top]): each
    catalog row's neighbours as catalog rows, best first; -1 / 0.0 pad the rows of
    items with fewer."""
    n = len(item_ids)
    row_of = pd.Series(np.arange(n), index=item_ids)
    ordered = train.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    rows = row_of.loc[ordered["movieId"].to_numpy()].to_numpy()
    users = ordered["userId"].to_numpy()
    a_parts, b_parts = [], []
    for d in range(1, window + 1):
        same = users[d:] == users[:-d]
        a_parts.append(rows[:-d][same])
        b_parts.append(rows[d:][same])
    a = np.concatenate([*a_parts, *b_parts])
    b = np.concatenate([*b_parts, *a_parts])
    keep = a != b
    counts = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (a[keep], b[keep])), shape=(n, n))
    counts.sum_duplicates()
    freq = np.bincount(rows, minlength=n).astype(np.float32)
    inv = 1.0 / np.sqrt(np.maximum(freq, 1.0))
    scores = sp.diags(inv) @ counts @ sp.diags(inv)
    scores = scores.tocsr()
    out_rows = np.full((n, top), -1, np.int32)
    out_scores = np.zeros((n, top), np.float32)
    indptr, indices, data = scores.indptr, scores.indices, scores.data
    for r in np.flatnonzero(np.diff(indptr)):
        lo, hi = indptr[r], indptr[r + 1]
        vals = data[lo:hi]
        best = np.argsort(-vals, kind="stable")[:top]
        out_rows[r, : len(best)] = indices[lo:hi][best]
        out_scores[r, : len(best)] = vals[best]
    return out_rows, out_scores
