"""Baselines for the quality report: popularity, EASE^R and iALS, each tuned on the
validation split carved from training (the same one the towers and the ranker are
chosen on), then refit on all training ratings and scored on the holdout with the
report's metric code.

- EASE^R (Steck, 2019): closed-form item-item weights, B = I - P / diag(P) with
  P = (X^T X + lambda I)^-1, zero diagonal. Dense in items: the report runs it
  below ``EASE_MAX_ITEMS`` items and says so above.
- iALS (Hu, Koren, Volinsky, 2008) from the ``implicit`` package (CPU), confidence
  1 + alpha on every rating.

Every rating is an interaction (the held-out relevance is a rating >= the positive
threshold, as for sieve). Seen items are excluded from every list.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ranker.evaluate import ndcg_at_k

log = logging.getLogger(__name__)

EASE_MAX_ITEMS = 40_000
"""EASE inverts a dense items x items matrix: 40k items is 12.8 GB in float64."""
EASE_GRID = {"lambda_": (100.0, 300.0, 1000.0, 3000.0)}
IALS_GRID = {
    "factors": (64, 128, 256),
    "regularization": (0.1, 1.0, 10.0, 100.0),
    "alpha": (1.0, 10.0),
    "iterations": (15,),
}

Scorer = Callable[[np.ndarray], np.ndarray]
"""Rows of users (of the interaction matrix) -> [len(rows), n_items] scores."""


@dataclass
class Interactions:
    """A ratings table as a users x items 0/1 matrix (items in catalog order)."""

    matrix: sp.csr_matrix
    user_row: pd.Series  # userId -> row


def interactions(ratings: pd.DataFrame, item_ids: np.ndarray) -> Interactions:
    users = np.sort(ratings["userId"].unique())
    user_row = pd.Series(np.arange(len(users)), index=users)
    item_row = pd.Series(np.arange(len(item_ids)), index=item_ids)
    r = user_row.loc[ratings["userId"].to_numpy()].to_numpy()
    c = item_row.loc[ratings["movieId"].to_numpy()].to_numpy()
    m = sp.csr_matrix(
        (np.ones(len(r), np.float32), (r, c)), shape=(len(users), len(item_ids)), dtype=np.float32
    )
    m.data[:] = 1.0  # a rating twice is one interaction
    return Interactions(m, user_row)


def fit_ease(x: sp.csr_matrix, lambda_: float) -> Scorer:
    """EASE^R over the items someone interacted with (the others score 0)."""
    used = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)
    xs = x[:, used]
    g = (xs.T @ xs).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lambda_
    p = np.linalg.inv(g)
    b = (p / -np.diag(p)).astype(np.float32)
    np.fill_diagonal(b, 0.0)
    n = x.shape[1]

    def score(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), n), np.float32)
        out[:, used] = xs[rows] @ b
        return out

    return score


def fit_ials(
    x: sp.csr_matrix,
    factors: int,
    regularization: float,
    alpha: float,
    iterations: int,
    seed: int = 0,
) -> Scorer:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit's own threads do the work
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            random_state=seed,
        )
        model.fit(x, show_progress=False)
    users, items = np.asarray(model.user_factors), np.asarray(model.item_factors)

    def score(rows: np.ndarray) -> np.ndarray:
        return users[rows] @ items.T

    return score


def fit_popularity(x: sp.csr_matrix) -> Scorer:
    counts = np.asarray(x.sum(axis=0), np.float32).ravel()

    def score(rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(counts, (len(rows), len(counts))).copy()

    return score


def top_unseen(
    scorer: Scorer, inter: Interactions, user_ids: Iterable[int], item_ids: np.ndarray, k: int
) -> dict[int, np.ndarray]:
    """Each user's top ``k`` unseen item ids, best first."""
    users = [u for u in user_ids if u in inter.user_row.index]
    out: dict[int, np.ndarray] = {}
    for lo in range(0, len(users), 256):
        part = users[lo : lo + 256]
        rows = inter.user_row.loc[part].to_numpy()
        s = scorer(rows)
        seen = inter.matrix[rows]
        s[seen.nonzero()] = -np.inf
        kk = min(k, s.shape[1] - 1)
        top = np.argpartition(-s, kk, axis=1)[:, :kk]
        for i, u in enumerate(part):
            order = top[i][np.argsort(-s[i, top[i]], kind="stable")]
            out[int(u)] = item_ids[order]
    return out


@dataclass
class Tuned:
    name: str
    params: dict[str, Any]
    validation: list[dict[str, Any]] = field(default_factory=list)
    """Every setting tried and its validation NDCG@10."""
    seconds: float = 0.0


def tune(
    name: str,
    fit: Callable[..., Scorer],
    grid: dict[str, tuple[Any, ...]],
    early: pd.DataFrame,
    late: pd.DataFrame,
    item_ids: np.ndarray,
    positive: float,
) -> Tuned:
    """The setting of ``grid`` with the best NDCG@10 on ``late`` (the validation
    split's later part) when fit on ``early``."""
    t0 = time.perf_counter()
    inter = interactions(early, item_ids)
    relevant = late[late["rating"] >= positive].groupby("userId")["movieId"].apply(set)
    out = Tuned(name, {})
    best = -1.0
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        lists = top_unseen(fit(inter.matrix, **params), inter, relevant.index, item_ids, 10)
        score = float(np.mean([ndcg_at_k(lists[u], relevant[u], 10) for u in lists]))
        out.validation.append({**params, "ndcg@10": round(score, 4)})
        log.info("%s %s: validation NDCG@10 %.4f", name, params, score)
        if score > best:
            best, out.params = score, params
    out.seconds = round(time.perf_counter() - t0, 1)
    return out


FITS: dict[str, Callable[..., Scorer]] = {"ease": fit_ease, "ials": fit_ials}
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {"ease": EASE_GRID, "ials": IALS_GRID}
"""Each baseline's fit and the settings its tuning tries."""
