"""The candidate gRPC service: a thin adapter around ``CandidateIndex``."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa

from candidate.config import CandidateConfig
from candidate.index import (
    CandidateIndex,
    SearchRequest,
    SearchResult,
    gpu_count,
    parse_search_params,
    set_gpu_params,
    to_gpu,
)
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve import artifacts
from sieve.artifacts import release_off_loop
from sieve.batcher import MicroBatcher, per_group
from sieve.errors import (
    ArtifactError,
    ConfigError,
    InvalidRequest,
    NotFound,
    NotReady,
    VersionNotLoaded,
    grpc_errors,
)
from sieve.grpc_server import Server, add_servicer
from sieve.validation import echo, echo_list, id_list, query_vector

log = logging.getLogger(__name__)
SERVICE_NAME = sieve_pb2.DESCRIPTOR.services_by_name["CandidateService"].full_name


@dataclass(frozen=True)
class RetrieveQuery:
    vector: np.ndarray | None  # float32 [d], or None when user_id is given
    user_id: int
    k: int
    exclude: np.ndarray  # int64
    allow: list[str]  # categories; empty: all
    version: str  # artifact version to serve from; empty: the newest loaded


def parse_retrieve(req: sieve_pb2.RetrieveRequest, config: CandidateConfig) -> RetrieveQuery:
    """Validate a RetrieveRequest.

    Raises:
        InvalidRequest: saying which field is wrong and what is allowed.
    """
    which = req.WhichOneof("query")
    if which is None:
        raise InvalidRequest("set either user_vector or user_id")
    if not 1 <= req.k <= config.max_k:
        raise InvalidRequest(
            f"k must be in 1..{config.max_k} (candidate.max_k; Faiss on a GPU returns at "
            f"most 2048), got {req.k}"
        )
    exclude = id_list(req.exclude_item_ids, config.max_exclude, "exclude_item_ids")
    if which == "user_id":
        if req.user_id <= 0:
            raise InvalidRequest(f"user_id must be positive, got {req.user_id}")
        return RetrieveQuery(
            None, req.user_id, req.k, exclude, list(req.allow_categories), req.artifact_version
        )
    vector = query_vector(req.user_vector.values, "user_vector")
    return RetrieveQuery(
        vector, 0, req.k, exclude, list(req.allow_categories), req.artifact_version
    )


def check_on(index: CandidateIndex, q: RetrieveQuery) -> None:
    """The checks that need the index: the vector's dimension and the categories.
    Made before a search, so one bad request cannot fail the batch it would join.

    Raises:
        InvalidRequest: naming user_vector or allow_categories.
    """
    if q.vector is not None and len(q.vector) != index.dim:
        raise InvalidRequest(
            f"user_vector has {len(q.vector)} values, the index expects {index.dim}"
        )
    known = index.categories
    unknown = [c for c in dict.fromkeys(q.allow) if c not in known]
    if unknown:
        raise InvalidRequest(
            f"allow_categories holds unknown categories {echo_list(unknown)}; known: {known}"
        )


@dataclass(frozen=True)
class _Live:
    """One loaded artifact set; never mutated, so a request that took it keeps a
    consistent index and version through a swap."""

    index: CandidateIndex
    version: str


def pick(loaded: tuple[_Live, ...], version: str) -> _Live:
    """The set a request is served from: ``version``, or the newest when it is empty.

    Args:
        loaded: the held sets, newest first.

    Raises:
        NotReady: nothing is loaded yet.
        VersionNotLoaded: ``version`` is not among ``loaded``; names the held ones.
    """
    if not loaded:
        raise NotReady("candidate index is not loaded yet")
    if not version:
        return loaded[0]
    for live in loaded:
        if live.version == version:
            return live
    held = ", ".join(live.version for live in loaded)
    raise VersionNotLoaded(
        f"artifact version {echo(version)} is not loaded here; loaded: {held} (newest first)"
    )


def category_masks(genres: pd.Series) -> dict[str, np.ndarray]:
    """Catalog genre strings ("A|B") -> {genre: bool mask over catalog rows}.

    A catalog has few distinct genre strings: each is split once, then every
    genre's mask is a lookup over the factorized codes (1M rows in ~0.1 s).
    """
    codes, uniques = pd.factorize(genres.fillna("").astype(str))
    parts = [set(u.split("|")) - {""} for u in uniques]
    names = sorted(set().union(*parts)) if parts else []
    return {name: np.array([name in p for p in parts], bool)[codes] for name in names}


def use_gpu(config: CandidateConfig) -> bool:
    """Whether to search on a GPU, decided once at start-up.

    Raises:
        ConfigError: ``device`` is ``gpu`` and Faiss sees none.
    """
    gpus = gpu_count()
    if config.device == "gpu" and gpus == 0:
        raise ConfigError(
            "candidate.device is 'gpu' but Faiss sees no GPU (faiss-cpu installed? "
            "install the gpu extra, or set device to 'auto' or 'cpu')"
        )
    if config.device != "cpu" and gpus > 0 and config.gpu_id >= gpus:
        raise ConfigError(f"candidate.gpu_id is {config.gpu_id}, Faiss sees {gpus} GPU(s)")
    return config.device != "cpu" and gpus > 0


class CandidateServicer(sieve_pb2_grpc.CandidateServiceServicer):
    def __init__(self, config: CandidateConfig, artifacts_root: Path) -> None:
        self.config = config
        self.artifacts_root = Path(artifacts_root)
        # Held sets, newest (live) first, at most config.keep_versions; replaced as one
        # tuple, never mutated, so a request sees either the old tuple or the new one.
        self._loaded: tuple[_Live, ...] = ()
        self._refused = ""  # a version that failed to load, skipped until CURRENT moves on
        self.on_gpu = use_gpu(config)
        # Searches get their own pool: its size bounds the cores they take, and a
        # set loading in asyncio's default pool never waits behind them (nor they
        # behind it).
        self._search_pool = ThreadPoolExecutor(config.search_threads, thread_name_prefix="search")
        on = config.batching == "on" or (config.batching == "auto" and self.on_gpu)
        self.batcher: MicroBatcher[tuple[_Live, SearchRequest], tuple[SearchResult, str]] | None = (
            MicroBatcher(
                self._search_batch,
                config.batch_max_size,
                config.batch_max_wait_us,
                config.batch_max_queue,
            )
            if on
            else None
        )

    def _search_batch(
        self, reqs: list[tuple[_Live, SearchRequest]]
    ) -> list[tuple[SearchResult, str]]:
        """Search each request on the set it took when it arrived (its pinned version
        or the newest then): one ``search_many`` per set, so a batch that spans a swap
        or several pinned versions never answers a request from another set's index."""

        def on_set(live: _Live, group: list[SearchRequest]) -> list[tuple[SearchResult, str]]:
            found = live.index.search_many(group, self.config.batch_exclude_slack)
            return [(res, live.version) for res in found]

        return per_group(reqs, on_set)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self._search_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def version(self) -> str:
        """The newest loaded version (what unpinned requests get); empty before start."""
        return self._loaded[0].version if self._loaded else ""

    @property
    def versions(self) -> tuple[str, ...]:
        """Every held version, newest first."""
        return tuple(live.version for live in self._loaded)

    async def start(self) -> None:
        """Load the live artifact set and warm the index up.

        Raises:
            ArtifactError: naming the missing or corrupt file.
        """
        self._loaded = (await self._load_live(artifacts.current_version(self.artifacts_root)),)
        if self.batcher is not None:
            self.batcher.start()

    async def _load_live(self, version: str) -> _Live:
        index, version = await asyncio.to_thread(self._load, version)
        await asyncio.to_thread(index.warm_up, min(1000, self.config.max_k))
        return _Live(index, version)

    async def reload(self) -> bool:
        """Make the set ``CURRENT`` names the newest if it is not. A new set is loaded
        beside the held ones; the previous sets stay (``keep_versions`` in all) for
        requests pinned to them, and in-flight searches finish on the set they took.
        A version already held (a rollback) is moved to the front without loading. A
        set that fails to load is refused (logged, once) and the held ones keep
        serving.

        Returns:
            Whether the newest set changed.
        """
        try:
            target = artifacts.current_version(self.artifacts_root)
        except ArtifactError as e:
            log.error("artifact reload: %s; still serving %s", e, self.version)
            return False
        if target in (self.version, self._refused):
            return False
        held = [live for live in self._loaded if live.version == target]
        if held:
            live = held[0]
        else:
            try:
                live = await self._load_live(target)
            except ArtifactError as e:
                self._refused = target
                log.error("refused artifact set %s: %s; still serving %s", target, e, self.version)
                return False
        old = self.version
        before = self._loaded
        self._loaded = (live, *(s for s in before if s is not live))[: self.config.keep_versions]
        dropped: list[Any] = [s for s in before if s not in self._loaded]
        del before, held
        log.info(
            "candidate index swapped: %s -> %s (held: %s)",
            old,
            live.version,
            ", ".join(self.versions),
        )
        await release_off_loop(dropped)  # an in-flight search may still hold one
        return True

    def _load(self, version: str) -> tuple[CandidateIndex, str]:
        import faiss

        faiss.omp_set_num_threads(self.config.omp_threads)
        aset = artifacts.load(self.artifacts_root, version)
        catalog_path = aset.verified("catalog")
        try:
            catalog = pd.read_parquet(catalog_path, columns=["item_id", "genres"])
            item_ids = catalog["item_id"].to_numpy(np.int64)
        except (pa.ArrowException, OSError, KeyError, ValueError, TypeError) as e:
            raise ArtifactError(
                f"catalog file {catalog_path} has no readable item_id and genres columns: "
                f"{type(e).__name__}: {e}"
            ) from e
        spec = aset.manifest["index"].get("search_params", "")
        try:
            if not isinstance(spec, str):
                raise ValueError(f"search_params is {spec!r}, not a string")
            search_params = parse_search_params(spec)
        except ValueError as e:
            raise ArtifactError(f"{aset.root / artifacts.MANIFEST}: index: {e}") from e
        index_path = aset.verified("index")  # reading it for the checksum warms the cache too
        index = CandidateIndex.load(
            index_path,
            item_ids,
            aset.verified("user_vectors"),
            mmap=self.config.index_mmap,
            search_params=search_params,
            categories=category_masks(catalog["genres"]),
        )
        where = "CPU"
        if self.on_gpu:
            embeddings = None
            if self.config.gpu_index == "flat":
                embeddings = np.load(aset.verified("item_embeddings"), mmap_mode="r")
                if embeddings.shape != (index.index.ntotal, index.dim):
                    raise ArtifactError(
                        f"item embeddings {aset.path('item_embeddings')} have shape "
                        f"{embeddings.shape}, the index {(index.index.ntotal, index.dim)}"
                    )
            index.accelerated = to_gpu(index.index, embeddings, self.config.gpu_id)
            if embeddings is None:
                set_gpu_params(index.accelerated.index, index.search_params)
            where = f"GPU {self.config.gpu_id} ({self.config.gpu_index})"
        log.info(
            "candidate index %s: %d items, dim %d, %s, searched on %s",
            aset.version,
            index.index.ntotal,
            index.dim,
            aset.manifest["index"].get("factory", "?"),
            where,
        )
        return index, aset.version

    @grpc_errors
    async def Retrieve(
        self, request: sieve_pb2.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> sieve_pb2.RetrieveResponse:
        q = parse_retrieve(request, self.config)
        live = pick(self._loaded, q.version)
        index = live.index
        check_on(index, q)
        vector = q.vector
        if vector is None:
            vector = index.user_vector(q.user_id)
            if vector is None:
                raise NotFound(f"user_id {q.user_id} has no stored vector; send user_vector")
        t0 = time.perf_counter()
        version = live.version
        if self.batcher is not None:
            # Checked here, so one bad vector cannot fail the batch it would join.
            req = SearchRequest(index.check_query(vector), q.k, q.exclude, q.allow)
            result, version = await self.batcher.submit((live, req))
        else:
            # Faiss releases the GIL: the loop serves other calls while a worker searches.
            result = await asyncio.get_running_loop().run_in_executor(
                self._search_pool, index.search, vector, q.k, q.exclude, q.allow
            )
        search_us = int((time.perf_counter() - t0) * 1e6)
        return sieve_pb2.RetrieveResponse(
            item_ids=result.item_ids.tolist(),
            scores=result.scores.tolist(),
            artifact_version=version,
            search_us=search_us,
        )


async def create_server(
    config: CandidateConfig, artifacts_root: Path
) -> tuple[Server, CandidateServicer]:
    """Start the candidate server (NOT_SERVING), load artifacts, then SERVING.

    Raises:
        ArtifactError: artifacts missing or corrupt; the server is stopped first.
    """
    servicer = CandidateServicer(config, artifacts_root)
    server = Server(SERVICE_NAME, config.host, config.port)
    server.every(config.reload_check_s, servicer.reload, "artifact reload")
    server.on_stop(servicer.close)
    add_servicer(server.server, servicer, sieve_pb2, "CandidateService")
    await server.start_serving(servicer.start)
    return server, servicer
