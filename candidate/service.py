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

from candidate.index import CandidateIndex, gpu_count, parse_search_params
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve import artifacts
from sieve.config import CandidateConfig
from sieve.errors import InvalidRequest, NotFound, NotReady, grpc_errors
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
        return RetrieveQuery(None, req.user_id, req.k, exclude)
    vector = np.asarray(req.user_vector.values, dtype=np.float32)
    if len(vector) == 0:
        raise InvalidRequest("user_vector is empty")
    return RetrieveQuery(vector, 0, req.k, exclude)


class CandidateServicer(sieve_pb2_grpc.CandidateServiceServicer):
    def __init__(self, config: CandidateConfig, artifacts_root: Path) -> None:
        self.config = config
        self.artifacts_root = Path(artifacts_root)
        self.index: CandidateIndex | None = None
        self.version = ""

    async def start(self) -> None:
        """Load the live artifact set and warm the index up.

        Raises:
            ArtifactError: naming the missing or corrupt file.
        """
        index, version = await asyncio.to_thread(self._load)
        index.warm_up(min(1000, self.config.max_k))
        self.index, self.version = index, version

    def _load(self) -> tuple[CandidateIndex, str]:
        import faiss

        faiss.omp_set_num_threads(self.config.omp_threads)
        aset = artifacts.load(self.artifacts_root)
        catalog = pd.read_parquet(aset.verified("catalog"), columns=["item_id"])
        index = CandidateIndex.load(
            aset.verified("index"),
            catalog["item_id"].to_numpy(np.int64),
            aset.verified("user_vectors"),
            search_params=parse_search_params(aset.manifest["index"].get("search_params", "")),
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
        index = self.index
        if index is None:
            raise NotReady("candidate index is not loaded yet")
        q = parse_retrieve(request, self.config)
        vector = q.vector
        if vector is None:
            vector = index.user_vector(q.user_id)
            if vector is None:
                raise NotFound(f"user_id {q.user_id} has no stored vector; send user_vector")
        t0 = time.perf_counter()
        # Faiss releases the GIL: searching in a worker thread lets requests overlap.
        result = await asyncio.to_thread(index.search, vector, q.k, q.exclude)
        search_us = int((time.perf_counter() - t0) * 1e6)
        return sieve_pb2.RetrieveResponse(
            item_ids=result.item_ids.tolist(),
            scores=result.scores.tolist(),
            artifact_version=self.version,
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
    sieve_pb2_grpc.add_CandidateServiceServicer_to_server(servicer, server.server)
    await server.start_serving(servicer.start)
    return server, servicer
