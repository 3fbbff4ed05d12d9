"""The candidate gRPC service: a thin adapter around ``CandidateIndex``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd

from candidate.index import (
    CandidateIndex,
    SearchRequest,
    SearchResult,
    gpu_count,
    parse_search_params,
)
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve import artifacts
from sieve.batcher import MicroBatcher
from sieve.config import CandidateConfig
from sieve.errors import ArtifactError, InvalidRequest, NotFound, NotReady, grpc_errors
from sieve.grpc_server import Server
from sieve.validation import id_list

log = logging.getLogger(__name__)
SERVICE_NAME = sieve_pb2.DESCRIPTOR.services_by_name["CandidateService"].full_name


@dataclass(frozen=True)
class RetrieveQuery:
    vector: np.ndarray | None  # float32 [d], or None when user_id is given
    user_id: int
    k: int
    exclude: np.ndarray  # int64
    allow: list[str]  # categories; empty: all


def parse_retrieve(req: sieve_pb2.RetrieveRequest, config: CandidateConfig) -> RetrieveQuery:
    """Validate a RetrieveRequest.

    Raises:
        InvalidRequest: saying which field is wrong and what is allowed.
    """
    which = req.WhichOneof("query")
    if which is None:
        raise InvalidRequest("set either user_vector or user_id")
    if not 1 <= req.k <= config.max_k:
        raise InvalidRequest(f"k must be in 1..{config.max_k}, got {req.k}")
    exclude = id_list(req.exclude_item_ids, config.max_exclude, "exclude_item_ids")
    if which == "user_id":
        if req.user_id <= 0:
            raise InvalidRequest(f"user_id must be positive, got {req.user_id}")
        return RetrieveQuery(None, req.user_id, req.k, exclude, list(req.allow_categories))
    vector = np.asarray(req.user_vector.values, dtype=np.float32)
    if len(vector) == 0:
        raise InvalidRequest("user_vector is empty")
    return RetrieveQuery(vector, 0, req.k, exclude, list(req.allow_categories))


@dataclass(frozen=True)
class _Live:
    """The artifact set being served; replaced as one reference, never mutated, so a
    request that took it keeps a consistent index and version through a swap."""

    index: CandidateIndex
    version: str


def category_masks(genres: pd.Series) -> dict[str, np.ndarray]:
    """Catalog genre strings ("A|B") -> {genre: bool mask over catalog rows}.

    A catalog has few distinct genre strings: each is split once, then every
    genre's mask is a lookup over the factorized codes (1M rows in ~0.1 s).
    """
    codes, uniques = pd.factorize(genres.fillna("").astype(str))
    parts = [set(u.split("|")) - {""} for u in uniques]
    names = sorted(set().union(*parts)) if parts else []
    return {name: np.array([name in p for p in parts], bool)[codes] for name in names}


class CandidateServicer(sieve_pb2_grpc.CandidateServiceServicer):
    def __init__(self, config: CandidateConfig, artifacts_root: Path) -> None:
        self.config = config
        self.artifacts_root = Path(artifacts_root)
        self._live: _Live | None = None
        self._refused = ""  # a version that failed to load, skipped until CURRENT moves on
        on = config.batching == "on" or (config.batching == "auto" and gpu_count() > 0)
        self.batcher: MicroBatcher[SearchRequest, tuple[SearchResult, str]] | None = (
            MicroBatcher(
                self._search_batch,
                config.batch_max_size,
                config.batch_max_wait_us,
                config.batch_max_queue,
            )
            if on
            else None
        )

    def _search_batch(self, reqs: list[SearchRequest]) -> list[tuple[SearchResult, str]]:
        live = self._live
        if live is None:
            raise NotReady("candidate index is not loaded yet")
        results = live.index.search_many(reqs, self.config.batch_exclude_slack)
        return [(r, live.version) for r in results]

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    @property
    def version(self) -> str:
        return self._live.version if self._live else ""

    async def start(self) -> None:
        """Load the live artifact set and warm the index up.

        Raises:
            ArtifactError: naming the missing or corrupt file.
        """
        self._live = await self._load_live()
        if self.batcher is not None:
            self.batcher.start()

    async def _load_live(self) -> _Live:
        index, version = await asyncio.to_thread(self._load)
        await asyncio.to_thread(index.warm_up, min(1000, self.config.max_k))
        return _Live(index, version)

    async def reload(self) -> bool:
        """Swap to the set ``CURRENT`` names if it is new. In-flight searches finish
        on the old index; a set that fails to load is refused (logged, once) and the
        last good one keeps serving.

        Returns:
            Whether a new set went live.
        """
        try:
            target = artifacts.current_version(self.artifacts_root)
        except ArtifactError as e:
            log.error("artifact reload: %s; still serving %s", e, self.version)
            return False
        if target in (self.version, self._refused):
            return False
        try:
            live = await self._load_live()
        except ArtifactError as e:
            self._refused = target
            log.error("refused artifact set %s: %s; still serving %s", target, e, self.version)
            return False
        old, self._live = self.version, live
        log.info("candidate index swapped: %s -> %s", old, live.version)
        return True

    def _load(self) -> tuple[CandidateIndex, str]:
        import faiss

        faiss.omp_set_num_threads(self.config.omp_threads)
        aset = artifacts.load(self.artifacts_root)
        catalog = pd.read_parquet(aset.verified("catalog"), columns=["item_id", "genres"])
        index_path = aset.verified("index")  # reading it for the checksum warms the cache too
        index = CandidateIndex.load(
            index_path,
            catalog["item_id"].to_numpy(np.int64),
            aset.verified("user_vectors"),
            search_params=parse_search_params(aset.manifest["index"].get("search_params", "")),
            categories=category_masks(catalog["genres"]),
        )
        gpus = gpu_count()
        log.info(
            "candidate index %s: %d items, dim %d, %s (GPUs seen: %d, serving on CPU)",
            aset.version,
            index.index.ntotal,
            index.dim,
            aset.manifest["index"]["factory"],
            gpus,
        )
        return index, aset.version

    @grpc_errors
    async def Retrieve(
        self, request: sieve_pb2.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> sieve_pb2.RetrieveResponse:
        live = self._live
        if live is None:
            raise NotReady("candidate index is not loaded yet")
        index = live.index
        q = parse_retrieve(request, self.config)
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
            result, version = await self.batcher.submit(req)
        else:
            # Faiss releases the GIL: searching in a worker thread lets requests overlap.
            result = await asyncio.to_thread(index.search, vector, q.k, q.exclude, q.allow)
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
    sieve_pb2_grpc.add_CandidateServiceServicer_to_server(servicer, server.server)
    await server.start_serving(servicer.start)
    return server, servicer
