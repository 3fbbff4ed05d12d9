"""Candidate sources, merged: what the model scores and where each item came from.

Pure numpy, used by serving, training rows and the quality report alike, so the
model is trained on candidates drawn the way they are served.

    learned   the two-tower ANN (the candidate service's main index), best first
    text      the MiniLM text ANN (reaches items nobody rated yet)
    i2i       item-to-item: the co-occurrence neighbours of the user's last items
    popular   the most popular items

Each source fills up to its quota (``ModelSection.sources`` in the manifest) with
items no earlier source gave and the user has not seen; an item several sources
return keeps every source's bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from sieve.ids import member

SOURCES = ("learned", "text", "i2i", "popular")
BIT = {name: np.uint8(1 << i) for i, name in enumerate(SOURCES)}
DEFAULT_QUOTAS: dict[str, int] = {"learned": 800, "text": 200, "i2i": 200, "popular": 100}
I2I_SEEDS = 10
"""The user's last this-many items seed the item-to-item source."""
I2I_DECAY = 0.8
"""A seed's weight: this to the power of its age (0: the last item)."""


class Candidates(NamedTuple):
    ids: np.ndarray  # int64 [n]
    sources: np.ndarray  # uint8 [n]: the BIT of every source that gave the item
    learned_rank: np.ndarray  # int32 [n]: rank in the learned list, -1 when not in it
    i2i_score: np.ndarray  # float32 [n]: the item-to-item score, 0 when no seed reaches it


def source_names(bits: int) -> list[str]:
    """The sources of one candidate's bits, in ``SOURCES`` order."""
    return [name for name in SOURCES if bits & int(BIT[name])]


def i2i_scores(
    neighbour_rows: np.ndarray,
    neighbour_scores: np.ndarray,
    seed_rows: np.ndarray,
    item_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Item-to-item candidates of one user: the neighbours of the seeds (catalog
    rows of the user's last items, oldest first), each neighbour's scores summed
    over the seeds with recency weights.

    Args:
        neighbour_rows: int32 [n, top] each catalog row's neighbours (-1: none).
        item_ids: the catalog's ids.

    Returns:
        (item ids sorted, their scores).
    """
    seeds = np.asarray(seed_rows, np.int64)[-I2I_SEEDS:]
    if len(seeds) == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    weights = I2I_DECAY ** np.arange(len(seeds) - 1, -1, -1, dtype=np.float32)
    rows = np.asarray(neighbour_rows[seeds]).reshape(-1)
    scores = (np.asarray(neighbour_scores[seeds], np.float32) * weights[:, None]).reshape(-1)
    keep = rows >= 0
    ids = item_ids[rows[keep]]
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, np.bincount(inv, weights=scores[keep], minlength=len(uniq)).astype(np.float32)


def merge(
    learned_ids: np.ndarray,
    text_ids: np.ndarray,
    i2i: tuple[np.ndarray, np.ndarray],
    popular_ids: np.ndarray,
    exclude: np.ndarray,
    quotas: Mapping[str, int],
) -> Candidates:
    """The sources' lists merged in ``SOURCES`` order with their quotas (see the
    module). ``exclude``: sorted ids never to return (the ANN lists come with the
    user's exclusions already applied inside the search)."""
    i2i_ids, i2i_vals = i2i
    order = np.argsort(-i2i_vals, kind="stable")
    lists = {
        "learned": np.asarray(learned_ids, np.int64),
        "text": np.asarray(text_ids, np.int64),
        "i2i": i2i_ids[order],
        "popular": np.asarray(popular_ids, np.int64),
    }
    taken: list[np.ndarray] = []
    consumed: dict[str, np.ndarray] = {}
    n_taken = 0
    for name in SOURCES:
        quota = int(quotas.get(name, 0))
        ids = lists[name]
        if quota <= 0 or len(ids) == 0:
            continue
        if name in ("i2i", "popular"):  # lists that still hold excluded items
            ids = ids[: quota + len(exclude) + n_taken]
            ids = ids[~member(ids, exclude)]
        new = ~member(ids, np.sort(np.concatenate(taken))) if taken else np.ones(len(ids), bool)
        # the source reads its list until it has given ``quota`` new items
        stop = int(np.searchsorted(np.cumsum(new), quota)) + 1
        consumed[name] = ids[:stop]
        taken.append(ids[:stop][new[:stop]])
        n_taken += len(taken[-1])
    cand = np.concatenate(taken) if taken else np.empty(0, np.int64)
    sources = np.zeros(len(cand), np.uint8)
    sorter = np.argsort(cand, kind="stable")
    for name, ids in consumed.items():
        hit = member(cand[sorter], np.sort(ids))
        sources[sorter[hit]] |= BIT[name]
    learned_rank = np.full(len(cand), -1, np.int32)
    n_learned = len(consumed.get("learned", ()))
    learned_rank[:n_learned] = np.arange(n_learned, dtype=np.int32)
    i2i_score = np.zeros(len(cand), np.float32)
    if len(i2i_ids):
        pos = np.searchsorted(i2i_ids, cand).clip(0, len(i2i_ids) - 1)
        found = i2i_ids[pos] == cand
        i2i_score[found] = i2i_vals[pos[found]]
    return Candidates(cand, sources, learned_rank, i2i_score)
