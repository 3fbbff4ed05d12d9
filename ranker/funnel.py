"""The funnel offline: one user's candidates and model inputs as the ranker serves
them, for training rows and the quality report. Pure numpy; the searches are
callables, so the same code runs over the candidate service's own index class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ranker.features import assemble, source_inputs, user_inputs
from ranker.sources import Candidates, i2i_scores, merge
from sieve.ids import IdIndex

Search = Callable[[np.ndarray, int, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(query vector, k, excluded item ids sorted) -> (item ids, scores), best first."""


@dataclass
class OfflineFunnel:
    """Everything a set serves candidates from, in catalog order."""

    item_ids: np.ndarray  # int64 [n]
    item_vectors: np.ndarray  # float32 [n, d], learned
    text_embeddings: np.ndarray  # float32 [n, 384]
    neighbour_rows: np.ndarray  # int32 [n, top]
    neighbour_scores: np.ndarray  # float32 [n, top]
    popular_ids: np.ndarray  # int64, most popular first
    item_cols: Mapping[str, np.ndarray]  # ITEM_INPUTS, catalog rows
    learned_search: Search
    text_search: Search
    quotas: Mapping[str, int]

    def __post_init__(self) -> None:
        self.rows = IdIndex(np.asarray(self.item_ids, np.int64))

    def candidates(self, user: Mapping[str, Any], exclude: np.ndarray) -> Candidates:
        """The merged candidates of a user-table row (``exclude``: sorted ids)."""
        q = self.quotas
        learned = text = np.empty(0, np.int64)
        if q.get("learned", 0) > 0:
            learned = self.learned_search(
                np.asarray(user["user_vector"], np.float32), q["learned"], exclude
            )[0]
        if q.get("text", 0) > 0:
            text = self.text_search(
                np.asarray(user["text_vector"], np.float32), q["text"], exclude
            )[0]
        recent_rows, found = self.rows.rows(np.asarray(user["recent_item_ids"], np.int64))
        i2i = i2i_scores(
            self.neighbour_rows, self.neighbour_scores, recent_rows[found], self.item_ids
        )
        return merge(learned, text, i2i, self.popular_ids, exclude, q)

    def inputs(self, user: Mapping[str, Any], cand: Candidates) -> np.ndarray:
        """The model's input rows for ``cand``."""
        rows, _ = self.rows.rows(cand.ids)
        recent_rows, found = self.rows.rows(np.asarray(user["recent_item_ids"], np.int64))
        ann, extra = source_inputs(
            cand.sources,
            cand.i2i_score,
            self.item_vectors[rows],
            np.asarray(user["user_vector"], np.float32),
            self.text_embeddings[rows],
            np.asarray(user["text_vector"], np.float32),
            self.item_vectors[recent_rows[found]],
        )
        return assemble(
            ann,
            cand.learned_rank,
            user_inputs(user),
            {c: v[rows] for c, v in self.item_cols.items()},
            extra,
        )
