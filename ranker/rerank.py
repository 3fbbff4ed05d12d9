"""The re-rank stage: business rules over scored candidates. Pure numpy."""

from __future__ import annotations

import numpy as np


def genre_cap(scores: np.ndarray, groups: np.ndarray, k: int, cap: int) -> tuple[np.ndarray, bool]:
    """Pick the best ``k`` by score with at most ``cap`` items per group.

    When the cap leaves fewer than k items, the best capped-out items fill the
    rest (the cap is relaxed rather than returning fewer items).

    Args:
        scores: float [n]; groups: int [n] (e.g. primary genre); k, cap >= 1.

    Returns:
        (indices into the inputs, best first, length min(k, n); whether the cap
        had to be relaxed).
    """
    n = len(scores)
    order = np.argsort(-np.asarray(scores), kind="stable")
    g = np.asarray(groups)[order]
    # Rank of each item within its group, in score order.
    by_group = np.lexsort((np.arange(n), g))
    gs = g[by_group]
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]]) if n else np.empty(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    within_sorted = np.arange(n) - np.repeat(starts, sizes)
    within = np.empty(n, dtype=np.int64)
    within[by_group] = within_sorted
    allowed = order[within < cap]
    chosen = allowed[:k]
    relaxed = False
    if len(chosen) < min(k, n):
        overflow = order[within >= cap]
        chosen = np.concatenate([chosen, overflow[: k - len(chosen)]])
        relaxed = True
    # The cap constrains the set; within it, best first.
    return chosen[np.argsort(-np.asarray(scores)[chosen], kind="stable")], relaxed
