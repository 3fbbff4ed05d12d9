"""The ANN stage: a Faiss index over item embeddings, searched with exclusions inside.

Rows of the index are positions in the artifact set's catalog (0..n-1); this
module maps item ids to rows and back, so callers only see item ids.
"""

from __future__ import annotations

import logging
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sieve.errors import ArtifactError, InvalidRequest
from sieve.ids import IdIndex

log = logging.getLogger(__name__)


SEARCH_KEYS = ("nprobe", "k_factor", "efSearch")
"""Search parameters sieve passes per request, in Faiss ParameterSpace syntax."""
DEFAULT_SEARCH = {"nprobe": 16, "k_factor": 2, "efSearch": 256}
"""Used when a factory is given without a value for a parameter it takes."""
AUTO_SMALL = ("Flat", "")
"""Below AUTO_THRESHOLD items exact search costs a few ms: no approximation."""
AUTO_LARGE = ("IVF4096,PQ192x4fsr,Refine(SQfp16)", "nprobe=320,k_factor=3")
"""The CPU default at AUTO_THRESHOLD items and more: 4-bit fast-scan PQ codes of
each vector's residual to its list centroid (``fsr``) shortlist 3k candidates
cheaply, and fp16 codes re-rank them. For inner product the residual codes still
need one look-up table per query (each list adds its centroid's score, which the
coarse search computed), and being finer they keep the recall with a shorter
shortlist, each shortlisted row being one random read.
At 1M x 384: recall@1000 0.956, p99 3.32 ms, 23.5x exact Flat (BENCHMARKS.md, ANN)."""
AUTO_LARGE_SHORT = "nprobe=64,k_factor=3"
"""AUTO_LARGE's parameters for a short list (at most SHORT_K results, as the text
source's quota of 100): at 1M x 384, top-100, recall 0.951 at p50 0.45 ms against
0.953 at 1.48 ms with nprobe 320 (BENCHMARKS.md, the learned retriever's funnel)."""
SHORT_K = 200
AUTO_LARGE_COMPACT = ("IVF4096,SQfp16", "nprobe=384")
"""The CPU default at AUTO_THRESHOLD items and more for vectors of at most
COMPACT_DIM dimensions (the learned space): fp16 codes of the whole vector (128
bytes at 64 dims) are scanned without a shortlist or a re-rank stage.
At 1M x 64, top-1200: recall 0.959, p99 1.16 ms, 8.9x exact (nprobe 512: 0.971 at
1.49 ms; the Rank A/B at 100/s chose the cheaper one; BENCHMARKS.md, ANN)."""
COMPACT_DIM = 128
AUTO_THRESHOLD = 200_000


def resolve_auto(
    n_items: int, factory: str, params: str, dim: int = 384, k: int = 1000
) -> tuple[str, str]:
    """Replace ``"auto"`` in the factory or the parameters by the measured defaults
    for ``n_items`` vectors of ``dim`` dimensions searched for ``k`` results."""
    large = AUTO_LARGE_COMPACT if dim <= COMPACT_DIM else AUTO_LARGE
    if large is AUTO_LARGE and k <= SHORT_K:
        large = (AUTO_LARGE[0], AUTO_LARGE_SHORT)
    auto_factory, auto_params = AUTO_SMALL if n_items < AUTO_THRESHOLD else large
    if factory == "auto":
        return auto_factory, auto_params if params == "auto" else params
    return factory, "" if params == "auto" else params


def parse_search_params(spec: str) -> dict[str, int]:
    """``"nprobe=128,k_factor=2"`` -> ``{"nprobe": 128, "k_factor": 2}``.

    Raises:
        ValueError: an unknown key or a value that is not a positive integer.
    """
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in SEARCH_KEYS:
            raise ValueError(f"search parameter {part!r}: expected one of {SEARCH_KEYS} as key=N")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"search parameter {key} must be a positive integer, got {value!r}")
        out[key] = int(value)
    return out


def search_parameters(
    index: faiss.Index, params: dict[str, int], k: int, sel: faiss.IDSelector | None
) -> faiss.SearchParameters:
    """The SearchParameters tree for ``index``: the selector goes to the level
    that scans (the base of a refine), nprobe/efSearch where they apply."""
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        refine = faiss.IndexRefineSearchParameters()
        refine.k_factor = float(params.get("k_factor", DEFAULT_SEARCH["k_factor"]))
        refine.base_index_params = search_parameters(top.base_index, params, k, sel)
        return refine
    p: Any
    ivf = faiss.try_extract_index_ivf(top)
    if ivf is not None:
        p = faiss.SearchParametersIVF()
        p.nprobe = params.get("nprobe", DEFAULT_SEARCH["nprobe"])
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            # An HNSW coarse quantizer finds at most efSearch good lists: give it 2x nprobe.
            qp = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            qp.efSearch = 2 * p.nprobe
            p.quantizer_params = qp
    elif isinstance(top, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # missing from the stubs
        # HNSW returns at most efSearch results: it must be at least k.
        p.efSearch = max(k, params.get("efSearch", DEFAULT_SEARCH["efSearch"]))
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    return p


def build_index(
    embeddings: np.ndarray,
    factory: str,
    seed: int = 0,
    train_size: int = 200_000,
    progress: bool = False,
) -> faiss.Index:
    """Train (on a seeded sample) and fill an inner-product index from ``index_factory``.

    Args:
        embeddings: float32 [n, d], L2-normalised, row i is catalog row i.
        train_size: at most this many rows train the quantizers.
        progress: show a progress bar while adding.

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
        rng = np.random.default_rng(seed)
        sample = x if len(x) <= train_size else x[np.sort(rng.choice(len(x), train_size, False))]
        index.train(sample)
    chunk = 100_000
    chunks = range(0, len(x), chunk)
    if progress and len(x) > chunk:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="adding to index", unit="chunk")  # type: ignore[assignment]
    for lo in chunks:
        index.add(x[lo : lo + chunk])
    return index


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


_READ_LOCK = threading.Lock()  # guards Faiss's process-wide deserialization limit


def read_index(path: Path, mmap: bool) -> faiss.Index:
    """Read an index, memory-mapped where its type allows (a fast restart: pages
    are loaded on first use and shared with the page cache), else into memory.

    No array in the file can be larger than the file: while reading, Faiss's
    deserialization limit says so, so a corrupt header that claims terabytes is a
    RuntimeError instead of an allocation that fails or gets the process killed.

    Raises:
        RuntimeError: Faiss cannot read the file (unknown type, truncated, or a
            header that does not fit the file).
    """
    # Faiss refuses arrays of limit / 4 bytes or more: allow those of the file's size.
    limit = 4 * (path.stat().st_size + 4096)
    get = getattr(faiss, "get_deserialization_vector_byte_limit", None)  # Faiss >= 1.15
    set_limit = getattr(faiss, "set_deserialization_vector_byte_limit", None)
    with _READ_LOCK:
        before = get() if get is not None else None
        if set_limit is not None and before is not None:
            set_limit(min(before, limit))
        try:
            if mmap:
                try:
                    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                except RuntimeError as e:
                    log.info(
                        "index %s cannot be memory-mapped (%s); reading it into memory", path, e
                    )
            return faiss.read_index(str(path))
        finally:
            if set_limit is not None and before is not None:
                set_limit(before)


GPU_MAX_K = 2048
"""Faiss GPU indexes return at most 2048 results per query."""


def gpu_count() -> int:
    """GPUs Faiss can use here (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@dataclass(frozen=True)
class Accelerated:
    """An index that cannot filter inside the search (Faiss GPU indexes ignore ID
    selectors), searched for extra results that are filtered afterwards."""

    index: faiss.Index
    max_k: int  # the most results one search may return
    keep_alive: Any = None  # GPU resources the index points into


def to_gpu(cpu_index: faiss.Index, embeddings: np.ndarray | None, device: int = 0) -> Accelerated:
    """The serving index on GPU ``device``.

    With ``embeddings`` (float32 [n, d], row i is catalog row i) the GPU holds an
    exact ``GpuIndexFlatIP``: at a million items brute force on a GPU is both
    exact and fast. Without, ``cpu_index`` is cloned (IVF-Flat/SQ/PQ clone; fast-scan
    PQ and refine indexes do not).

    Raises:
        ArtifactError: Faiss cannot put this index on the GPU.
    """
    res = faiss.StandardGpuResources()
    gpu: Any
    try:
        if embeddings is not None:
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = device
            gpu = faiss.GpuIndexFlatIP(res, embeddings.shape[1], cfg)
            gpu.add(np.ascontiguousarray(embeddings, np.float32))
        else:
            gpu = faiss.index_cpu_to_gpu(res, device, cpu_index)
    except RuntimeError as e:
        raise ArtifactError(f"Faiss cannot serve this index on GPU {device}: {e}") from e
    return Accelerated(gpu, GPU_MAX_K, res)


def set_gpu_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set search parameters on a cloned GPU index once (GPU indexes take no
    per-call SearchParameters tree like ``search_parameters`` builds)."""
    space = faiss.GpuParameterSpace()
    for key in ("nprobe",):
        if key in params:
            space.set_index_parameter(index, key, params[key])


@dataclass(frozen=True)
class SearchRequest:
    query: np.ndarray  # float32 [d], checked with CandidateIndex.check_query
    k: int
    exclude: np.ndarray  # int64 item ids
    allow: list[str] | None = None


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
        search_params: dict[str, int],
        categories: dict[str, np.ndarray] | None = None,
        accelerated: Accelerated | None = None,
    ) -> None:
        self.index = index
        self.accelerated = accelerated
        self.item_ids = np.asarray(item_ids, np.int64)
        self._rows = IdIndex(self.item_ids)
        self._user_ids = np.asarray(user_ids, np.int64)
        self._user_order = np.argsort(self._user_ids, kind="stable")
        self._user_vectors = np.asarray(user_vectors, np.float32)
        self.search_params = dict(search_params)
        # category -> packed bitmap over rows (little bit order, as IDSelectorBitmap reads)
        self._category_bits = {
            name: np.packbits(mask, bitorder="little") for name, mask in (categories or {}).items()
        }

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @classmethod
    def load(
        cls,
        index_path: Path,
        item_ids: np.ndarray,
        users_path: Path,
        search_params: dict[str, int],
        mmap: bool = True,
        categories: dict[str, np.ndarray] | None = None,
    ) -> CandidateIndex:
        """Read the index and user vectors and check they fit the catalog.

        Raises:
            ArtifactError: naming the file that is unreadable or does not match.
        """
        try:
            index = read_index(index_path, mmap)
        except (RuntimeError, MemoryError) as e:
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
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            # a truncated or garbled .npz fails in zipfile or zlib, not as an OSError
            raise ArtifactError(f"user vector file {users_path} is not readable: {e}") from e
        if (
            user_vectors.ndim != 2
            or user_vectors.shape[1] != index.d
            or user_ids.shape != (len(user_vectors),)
        ):
            raise ArtifactError(
                f"user vector file {users_path} has vectors {user_vectors.shape} for user ids "
                f"{user_ids.shape}, index dim {index.d}"
            )
        return cls(index, item_ids, user_ids, user_vectors, search_params, categories)

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
        rows, found = self._rows.rows(item_ids)
        return rows[found]

    def check_query(self, query: np.ndarray) -> np.ndarray:
        """``query`` as float32 [d].

        Raises:
            InvalidRequest: wrong dimension, or a NaN or infinity in it.
        """
        q = np.asarray(query, np.float32).reshape(-1)
        if len(q) != self.dim:
            raise InvalidRequest(f"user vector has {len(q)} values, the index expects {self.dim}")
        if not np.isfinite(q).all():
            raise InvalidRequest("user vector holds NaN or infinity")
        return q

    def search_many(
        self, reqs: list[SearchRequest], exclude_slack: int = 512
    ) -> list[SearchResult]:
        """Answer several requests, in one Faiss call where that gives the same answer.

        Faiss takes one selector per call (and a GPU index none), so requests are
        searched together for ``k + len(excluded)`` items and filtered afterwards
        (``_post_filtered``). On the CPU that is done for requests with at most
        ``exclude_slack`` excluded ids and no category filter; other requests, and
        any that come back short, are searched one by one with their selectors
        inside the search.
        """
        acc = self.accelerated
        if acc is not None:
            out = self._post_filtered(acc.index, acc.max_k, reqs, with_params=False)
        else:
            out = [None] * len(reqs)
            group = [
                i for i, r in enumerate(reqs) if not r.allow and len(r.exclude) <= exclude_slack
            ]
            if len(group) > 1:
                found = self._post_filtered(
                    self.index, int(self.index.ntotal), [reqs[i] for i in group], with_params=True
                )
                for i, res in zip(group, found, strict=True):
                    out[i] = res
        return [
            res if res is not None else self._search_selected(r.query, r.k, r.exclude, r.allow)
            for r, res in zip(reqs, out, strict=True)
        ]

    def _post_filtered(
        self, index: faiss.Index, max_k: int, reqs: list[SearchRequest], with_params: bool
    ) -> list[SearchResult | None]:
        """Search ``reqs`` in one call for ``k + len(excluded)`` results each (at most
        ``max_k``), then drop excluded rows and rows outside the allowed categories.

        What survives of a ranked list are the best valid items, in order; so a
        request with ``k`` survivors (or all the valid items there are) is answered
        exactly as a search with the filter inside would answer it. The others come
        back None, for a search with the selector inside.
        """
        ntotal = int(self.index.ntotal)
        queries = np.stack([self.check_query(r.query) for r in reqs])
        excluded = [self.rows_of(r.exclude) for r in reqs]
        kk = min(max_k, ntotal, max(r.k + len(e) for r, e in zip(reqs, excluded, strict=True)))
        if with_params:
            params = search_parameters(index, self.search_params, kk, None)
            scores, labels = index.search(queries, kk, params=params)
        else:
            scores, labels = index.search(queries, kk)
        out: list[SearchResult | None] = []
        for row, (r, ex) in enumerate(zip(reqs, excluded, strict=True)):
            lab = labels[row]
            keep = (lab >= 0) & ~np.isin(lab, ex)
            want = min(r.k, ntotal - len(ex))
            if r.allow:
                bits = self._allowed(r.allow)
                safe = np.where(keep, lab, 0)
                keep &= ((bits[safe >> 3] >> (safe & 7)) & 1).astype(bool)
                want = r.k  # how many allowed items exist is not known here
            got = lab[keep][: r.k]
            out.append(
                SearchResult(self.item_ids[got], scores[row][keep][: r.k].astype(np.float32))
                if len(got) >= want
                else None
            )
        return out

    @property
    def categories(self) -> list[str]:
        return sorted(self._category_bits)

    def _allowed(self, categories: list[str]) -> np.ndarray:
        unknown = [c for c in categories if c not in self._category_bits]
        if unknown:
            raise InvalidRequest(f"unknown categories {unknown}; known: {self.categories}")
        return np.bitwise_or.reduce([self._category_bits[c] for c in categories])

    def search(
        self,
        query: np.ndarray,
        k: int,
        exclude_item_ids: np.ndarray,
        allow_categories: list[str] | None = None,
    ) -> SearchResult:
        """Top ``k`` items by inner product with ``query``; excluded ids and items
        outside ``allow_categories`` are filtered inside the search (or, on a GPU,
        right after it), so up to k valid items come back.

        Raises:
            InvalidRequest: the query has the wrong dimension or a non-finite value,
                or a category is unknown.
        """
        if self.accelerated is None:
            return self._search_selected(query, k, exclude_item_ids, allow_categories)
        req = SearchRequest(query, k, np.asarray(exclude_item_ids, np.int64), allow_categories)
        return self.search_many([req])[0]

    def top(
        self, query: np.ndarray, k: int, exclude_item_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``search`` as (item ids, scores), the search the offline funnel takes."""
        res = self.search(query, k, exclude_item_ids)
        return res.item_ids, res.scores

    def _search_selected(
        self,
        query: np.ndarray,
        k: int,
        exclude_item_ids: np.ndarray,
        allow_categories: list[str] | None = None,
    ) -> SearchResult:
        """``search`` on the CPU index with the filters as Faiss ID selectors."""
        q = self.check_query(query).reshape(1, -1)
        k = min(k, int(self.index.ntotal))
        rows = self.rows_of(exclude_item_ids)
        # Keep both selectors referenced until the search returns: Faiss holds raw
        # pointers to them.
        batch = faiss.IDSelectorBatch(rows.astype(np.int64)) if len(rows) else None
        sel: Any = faiss.IDSelectorNot(batch) if batch is not None else None
        if allow_categories:
            bits = self._allowed(allow_categories)
            allowed = faiss.IDSelectorBitmap(int(self.index.ntotal), faiss.swig_ptr(bits))
            excluded_too = sel
            sel = (
                faiss.IDSelectorAnd(allowed, excluded_too) if excluded_too is not None else allowed
            )
        params = search_parameters(self.index, self.search_params, k, sel)
        scores, labels = self.index.search(q, k, params=params)
        keep = labels[0] >= 0
        return SearchResult(self.item_ids[labels[0][keep]], scores[0][keep].astype(np.float32))
