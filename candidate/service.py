"""The candidate gRPC service: a thin adapter that validates a Retrieve, takes the
set it names from the version holder and searches its ``CandidateIndex``."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from candidate.config import CandidateConfig
from candidate.index import CandidateIndex, SearchRequest, SearchResult
from candidate.sets import SPACES, LiveIndex, load_live, use_gpu
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve.auth import current_caller
from sieve.batcher import MicroBatcher, per_group
from sieve.errors import InvalidRequest, NotFound, grpc_errors
from sieve.grpc_server import Server, add_servicer
from sieve.logs import new_request_id, requests
from sieve.metrics import CANDIDATE_SECONDS, exemplar
from sieve.tls import warn_if_exposed
from sieve.tracing import open_tracer
from sieve.validation import echo, echo_list, id_list, query_vector
from sieve.versions import VersionHolder

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
    source: str = ""  # the space to search ("" or "learned", "text")
    more: tuple[SpaceQuery, ...] = ()  # more searches in other spaces, answered in order


@dataclass(frozen=True)
class SpaceQuery:
    """One of ``RetrieveRequest.more``: a search of another space, with the main
    query's exclusions, categories and version."""

    source: str
    vector: np.ndarray  # float32 [d of that space]
    k: int


def _space(source: str) -> str:
    return source or "learned"


def parse_more(req: sieve_pb2.RetrieveRequest, config: CandidateConfig) -> tuple[SpaceQuery, ...]:
    """Validate ``RetrieveRequest.more``: a known space each, none searched twice
    (the main query's included), k in range, a vector each.

    Raises:
        InvalidRequest: naming ``more[i]`` and the field.
    """
    seen = {_space(req.source)}
    out = []
    for i, m in enumerate(req.more):
        if m.source not in ("", *SPACES):
            raise InvalidRequest(
                f"more[{i}].source must be one of {list(SPACES)} (or empty), got {echo(m.source)}"
            )
        if _space(m.source) in seen:
            raise InvalidRequest(
                f"more[{i}] searches the {_space(m.source)} space again: one search per space "
                "and call (the main query's space counts)"
            )
        seen.add(_space(m.source))
        if not 1 <= m.k <= config.max_k:
            raise InvalidRequest(f"more[{i}].k must be in 1..{config.max_k}, got {m.k}")
        if not m.HasField("user_vector"):
            raise InvalidRequest(f"more[{i}].user_vector is missing")
        out.append(
            SpaceQuery(m.source, query_vector(m.user_vector.values, f"more[{i}].user_vector"), m.k)
        )
    return tuple(out)


def parse_retrieve(req: sieve_pb2.RetrieveRequest, config: CandidateConfig) -> RetrieveQuery:
    """Validate a RetrieveRequest.

    Raises:
        InvalidRequest: saying which field is wrong and what is allowed.
    """
    which = req.WhichOneof("query")
    if which is None:
        raise InvalidRequest("set either user_vector or user_id")
    if req.source not in ("", *SPACES):
        raise InvalidRequest(
            f"source must be one of {list(SPACES)} (or empty), got {echo(req.source)}"
        )
    if not 1 <= req.k <= config.max_k:
        raise InvalidRequest(
            f"k must be in 1..{config.max_k} (candidate.max_k; Faiss on a GPU returns at "
            f"most 2048), got {req.k}"
        )
    exclude = id_list(req.exclude_item_ids, config.max_exclude, "exclude_item_ids")
    more = parse_more(req, config)
    if which == "user_id":
        if req.user_id <= 0:
            raise InvalidRequest(f"user_id must be positive, got {req.user_id}")
        return RetrieveQuery(
            None,
            req.user_id,
            req.k,
            exclude,
            list(req.allow_categories),
            req.artifact_version,
            req.source,
            more,
        )
    vector = query_vector(req.user_vector.values, "user_vector")
    return RetrieveQuery(
        vector,
        0,
        req.k,
        exclude,
        list(req.allow_categories),
        req.artifact_version,
        req.source,
        more,
    )


def check_on(index: CandidateIndex, q: RetrieveQuery) -> None:
    """The checks that need the index: the vector's dimension and the categories.
    Made before a search, so one bad request cannot fail the batch it would join.

    Raises:
        InvalidRequest: naming user_vector or allow_categories.
    """
    if q.vector is not None:
        check_dim(index, q.vector, "user_vector")
    known = index.categories
    unknown = [c for c in dict.fromkeys(q.allow) if c not in known]
    if unknown:
        raise InvalidRequest(
            f"allow_categories holds unknown categories {echo_list(unknown)}; known: {known}"
        )


def check_dim(index: CandidateIndex, vector: np.ndarray, field: str) -> None:
    """Raises InvalidRequest when ``vector`` does not have the index's dimension."""
    if len(vector) != index.dim:
        raise InvalidRequest(f"{field} has {len(vector)} values, the index expects {index.dim}")


_Batcher = MicroBatcher[tuple[LiveIndex, SearchRequest], tuple[SearchResult, str, int]]


class CandidateServicer(sieve_pb2_grpc.CandidateServiceServicer):
    def __init__(self, config: CandidateConfig, artifacts_root: Path) -> None:
        self.config = config
        self.tracer = open_tracer(config.tracing, "sieve-candidate")
        self.on_gpu = use_gpu(config)
        self.sets: VersionHolder[LiveIndex] = VersionHolder(
            Path(artifacts_root),
            lambda version: load_live(config, Path(artifacts_root), version, self.on_gpu),
            keep=config.keep_versions,
            name="candidate",
            logger=log,
        )
        # Searches get their own pool: its size bounds the cores they take, and a
        # set loading in asyncio's default pool never waits behind them (nor they
        # behind it).
        self._search_pool = (
            ThreadPoolExecutor(config.search_threads, thread_name_prefix="search")
            if config.search_threads
            else None
        )
        on = config.batching == "on" or (config.batching == "auto" and self.on_gpu)
        self.batcher: _Batcher | None = (
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
        self, reqs: list[tuple[LiveIndex, SearchRequest]]
    ) -> list[tuple[SearchResult, str, int]]:
        """Search each request on the set it took when it arrived (its pinned version
        or the newest then): one ``search_many`` per set, so a batch that spans a swap
        or several pinned versions never answers a request from another set's index."""

        def on_set(
            live: LiveIndex, group: list[SearchRequest]
        ) -> list[tuple[SearchResult, str, int]]:
            t0 = time.perf_counter()
            found = live.index.search_many(group, self.config.batch_exclude_slack)
            us = int((time.perf_counter() - t0) * 1e6)
            return [(res, live.version, us) for res in found]

        return per_group(reqs, on_set)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self._search_pool is not None:
            self._search_pool.shutdown(wait=False, cancel_futures=True)
        await self.sets.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # flush what is batched

    @property
    def version(self) -> str:
        """The newest loaded version (what unpinned requests get); empty before start."""
        return self.sets.version

    @property
    def versions(self) -> tuple[str, ...]:
        """Every held version, newest first."""
        return self.sets.versions

    async def start(self) -> None:
        """Load the live artifact set and warm the index up.

        Raises:
            ArtifactError: naming the missing or corrupt file.
        """
        await self.sets.start()
        if self.batcher is not None:
            self.batcher.start()

    async def reload(self) -> bool:
        """Make the set ``CURRENT`` names the newest (``VersionHolder.reload``): the
        previous sets stay (``keep_versions`` in all) for requests pinned to them."""
        return await self.sets.reload()

    @grpc_errors
    async def Retrieve(
        self, request: sieve_pb2.RetrieveRequest, context: grpc.aio.ServicerContext
    ) -> sieve_pb2.RetrieveResponse:
        t0 = time.perf_counter()
        metadata = context.invocation_metadata()
        new_request_id(metadata)
        q = parse_retrieve(request, self.config)
        if self.tracer is None:
            with self.sets.use(q.version) as live:
                resp, queued_s = await self._retrieve(q, live.space(q.source), live)
            return observed(resp, q, t0, queued_s)
        attrs = {"rpc.system": "grpc", "rpc.method": "Retrieve", "sieve.k": q.k}
        with self.tracer.server_span("Retrieve", metadata, **attrs) as span:
            with self.sets.use(q.version) as live:
                resp, queued_s = await self._retrieve(q, live.space(q.source), live)
            span.set_attribute("sieve.artifact_version", resp.artifact_version)
            span.set_attribute(
                "sieve.search_us", resp.search_us + sum(m.search_us for m in resp.more)
            )
            if live.shards:
                span.set_attribute("sieve.shard", live.shard)
            return observed(resp, q, t0, queued_s)

    async def _retrieve(
        self, q: RetrieveQuery, main: LiveIndex, live: LiveIndex
    ) -> tuple[sieve_pb2.RetrieveResponse, float]:
        """The answer, and the seconds its searches waited for a search thread or a
        batch (0 when searched inline)."""
        check_on(main.index, q)
        vector = q.vector
        if vector is None:
            vector = main.index.user_vector(q.user_id)
            if vector is None:
                raise NotFound(f"user_id {q.user_id} has no stored vector; send user_vector")
        searches = [(main, vector, q.k)]
        for i, m in enumerate(q.more):
            space = live.space(m.source)
            check_dim(space.index, m.vector, f"more[{i}].user_vector")
            searches.append((space, m.vector, m.k))
        queued_s = 0.0
        if self.batcher is not None:
            # Checked here, so one bad vector cannot fail the batch it would join.
            batched = await asyncio.gather(*(self._batched(s, v, k, q) for s, v, k in searches))
            found = [(r, v, us) for r, v, us, _ in batched]
            queued_s = max(w for *_, w in batched)
        elif self._search_pool is None:
            found, _ = _search_all(searches, q.exclude, q.allow)
        else:
            # Faiss releases the GIL: the loop serves other calls while a worker
            # searches; every space of the call in one hand-off.
            found, queued_s = await asyncio.get_running_loop().run_in_executor(
                self._search_pool,
                _search_all,
                searches,
                q.exclude,
                q.allow,
                time.perf_counter(),
            )
        (result, version, search_us), *rest = found
        resp = sieve_pb2.RetrieveResponse(
            item_ids=result.item_ids.tolist(),
            scores=result.scores.tolist(),
            artifact_version=version,
            search_us=search_us,
            shard=max(live.shard, 0),
            shard_count=live.shards,
            more=[
                sieve_pb2.SpaceResult(
                    source=m.source,
                    item_ids=r.item_ids.tolist(),
                    scores=r.scores.tolist(),
                    search_us=us,
                )
                for m, (r, _, us) in zip(q.more, rest, strict=True)
            ],
        )
        return resp, queued_s

    async def _batched(
        self, space: LiveIndex, vector: np.ndarray, k: int, q: RetrieveQuery
    ) -> tuple[SearchResult, str, int, float]:
        """(result, version, microseconds of its batch's search, seconds waited for
        the batch to form and start)."""
        assert self.batcher is not None
        t0 = time.perf_counter()
        req = SearchRequest(space.index.check_query(vector), k, q.exclude, q.allow)
        result, version, batch_us = await self.batcher.submit((space, req))
        return result, version, batch_us, max(0.0, time.perf_counter() - t0 - batch_us / 1e6)


def observed(
    resp: sieve_pb2.RetrieveResponse, q: RetrieveQuery, t0: float, queued_s: float
) -> sieve_pb2.RetrieveResponse:
    """``resp``'s search time, its wait for a search thread or batch, and the call's
    in ``sieve_candidate_seconds``; its ``request`` line when in the sample."""
    ex = exemplar()
    search_us = resp.search_us + sum(m.search_us for m in resp.more)
    total_s = time.perf_counter() - t0
    CANDIDATE_SECONDS.labels("search").observe(search_us / 1e6, ex)
    CANDIDATE_SECONDS.labels("queue").observe(queued_s, ex)
    CANDIDATE_SECONDS.labels("total").observe(total_s, ex)
    request_log = requests()
    if request_log.sampled():
        request_log.request(
            "Retrieve",
            q.user_id if q.vector is None else None,
            caller=current_caller().label,
            k=q.k,
            spaces=1 + len(q.more),
            version=resp.artifact_version,
            search_ms=round(search_us / 1000, 3),
            queue_ms=round(queued_s * 1000, 3),
            total_ms=round(total_s * 1000, 3),
        )
    return resp


def _search_all(
    searches: list[tuple[LiveIndex, np.ndarray, int]],
    exclude: np.ndarray,
    allow: list[str],
    handed_off: float | None = None,
) -> tuple[list[tuple[SearchResult, str, int]], float]:
    """Each (space, vector, k) searched in turn: (result, version, microseconds), and
    the seconds since ``handed_off`` (a ``perf_counter`` time) before the first began."""
    queued_s = 0.0 if handed_off is None else max(0.0, time.perf_counter() - handed_off)
    out = []
    for space, vector, k in searches:
        t0 = time.perf_counter()
        result = space.index.search(vector, k, exclude, allow)
        out.append((result, space.version, int((time.perf_counter() - t0) * 1e6)))
    return out, queued_s


async def create_server(
    config: CandidateConfig, artifacts_root: Path
) -> tuple[Server, CandidateServicer]:
    """Start the candidate server (NOT_SERVING), load artifacts, then SERVING.

    Raises:
        ArtifactError: artifacts missing or corrupt; the server is stopped first.
    """
    servicer = CandidateServicer(config, artifacts_root)
    warn_if_exposed("candidate", config.host, config.tls)
    server = Server(
        SERVICE_NAME,
        config.host,
        config.port,
        None,
        config.max_connection_age_s,
        config.grace_s,
        config.tls,
        (config.auth, config.rate_limit, "candidate"),
    )
    server.serve_metrics(config.metrics_port)
    server.every(config.reload_check_s, servicer.reload, "artifact reload")
    server.on_stop(servicer.close)
    add_servicer(server.server, servicer, sieve_pb2, "CandidateService")
    await server.start_serving(servicer.start)
    return server, servicer
