"""The ANN stage: a Faiss index over item embeddings, searched with exclusions inside.

Rows of the index are positions in the artifact set's catalog (0..n-1); this
module maps item ids to rows and back, so callers only see item ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from sieve.errors import ArtifactError, InvalidRequest

log = logging.getLogger(__name__)


def build_index(embeddings: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    """Train (if needed) and fill an inner-product index from ``index_factory``.

    Args:
        embeddings: float32 [n, d], L2-normalised, row i is catalog row i.

    Raises:
        ValueError: the factory string is not one Faiss understands.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"index_factory {factory!r} rejected by Faiss: {e}") from e
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(x)
    index.add(x)
    return index


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def gpu_count() -> int:
    """GPUs Faiss can use here (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@dataclass(frozen=True)
class SearchResult:
    item_ids: np.ndarray  # int64 [m], m <= k, best first
    scores: np.ndarray  # float32 [m]


class CandidateIndex:
    """A loaded index plus the row <-> item id mapping and the stored user vectors."""

    def __init__(
        self,
        index: faiss.Index,
        item_ids: np.ndarray,
        user_ids: np.ndarray,
        user_vectors: np.ndarray,
        nprobe: int,
    ) -> None:
        self.index = index
        self.item_ids = np.asarray(item_ids, np.int64)
        self._sorted = np.argsort(self.item_ids, kind="stable")
        self._user_ids = np.asarray(user_ids, np.int64)
        self._user_order = np.argsort(self._user_ids, kind="stable")
        self._user_vectors = np.asarray(user_vectors, np.float32)
        self._ivf = faiss.try_extract_index_ivf(index)
        self.nprobe = nprobe

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def load(
        cls, index_path: Path, item_ids: np.ndarray, users_path: Path, nprobe: int
    ) -> CandidateIndex:
        """Read the index and user vectors and check they fit the catalog.

        Raises:
            ArtifactError: naming the file that is unreadable or does not match.
        """
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            raise ArtifactError(
                f"index file {index_path} is not a readable Faiss index: {e}"
            ) from e
        if index.ntotal != len(item_ids):
            raise ArtifactError(
                f"index file {index_path} holds {index.ntotal} vectors, the catalog {len(item_ids)}"
            )
        try:
            with np.load(users_path) as z:
                user_ids, user_vectors = z["user_ids"], z["vectors"]
        except (OSError, KeyError, ValueError) as e:
            raise ArtifactError(f"user vector file {users_path} is not readable: {e}") from e
        if user_vectors.ndim != 2 or user_vectors.shape[1] != index.d:
            raise ArtifactError(
                f"user vector file {users_path} has shape {user_vectors.shape}, index dim {index.d}"
            )
        return cls(index, item_ids, user_ids, user_vectors, nprobe)

    def warm_up(self, k: int, rounds: int = 3) -> None:
        """Run a few searches so first requests do not pay for lazy initialisation."""
        probe = self._user_vectors[0] if len(self._user_vectors) else np.ones(self.dim, np.float32)
        probe = probe / max(float(np.linalg.norm(probe)), 1e-12)
        for _ in range(rounds):
            self.search(probe, k, np.empty(0, np.int64))

    def user_vector(self, user_id: int) -> np.ndarray | None:
        """The stored vector of ``user_id``, or None for an unknown user."""
        pos = np.searchsorted(self._user_ids, user_id, sorter=self._user_order)
        if pos < len(self._user_ids) and self._user_ids[self._user_order[pos]] == user_id:
            return self._user_vectors[self._user_order[pos]]
        return None

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalog rows of the known ids among ``item_ids`` (unknown ids are dropped)."""
        ids = np.asarray(item_ids, np.int64)
        pos = np.searchsorted(self.item_ids, ids, sorter=self._sorted)
        pos = np.minimum(pos, len(self._sorted) - 1)
        rows = self._sorted[pos]
        return rows[self.item_ids[rows] == ids]

    def search(self, query: np.ndarray, k: int, exclude_item_ids: np.ndarray) -> SearchResult:
        """Top ``k`` items by inner product with ``query``, excluded ids filtered
        inside the search (so up to k valid items come back).

        Raises:
            InvalidRequest: the query has the wrong dimension or a non-finite value.
        """
        q = np.asarray(query, np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise InvalidRequest(
                f"user vector has {q.shape[1]} values, the index expects {self.dim}"
            )
        if not np.isfinite(q).all():
            raise InvalidRequest("user vector holds NaN or infinity")
        k = min(k, int(self.index.ntotal))
        rows = self.rows_of(exclude_item_ids)
        # Keep both selectors referenced until the search returns: Faiss holds raw
        # pointers to them.
        batch = faiss.IDSelectorBatch(rows.astype(np.int64)) if len(rows) else None
        sel = faiss.IDSelectorNot(batch) if batch is not None else None
        params: faiss.SearchParameters
        if self._ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = self.nprobe
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        scores, labels = self.index.search(q, k, params=params)
        keep = labels[0] >= 0
        return SearchResult(self.item_ids[labels[0][keep]], scores[0][keep].astype(np.float32))
