"""The ranker's request path, stage by stage, in one place.

    Rank(user) -> user features (online store)
               -> Retrieve over gRPC: 1,000 candidates, seen items excluded in the search
               -> + the most popular unseen items the search missed (200)
               -> item features (in-process table), cross features
               -> score (ONNX Runtime)
               -> re-rank: the rule chain of ``ranker.rerank`` -> k items

Each stage is timed; what the request had to give up is listed as a degradation.

Every stage has a deadline (``ranker.reliability.budget_ms``, bounded by the
caller's own deadline). A stage that fails or overruns takes the next rung of the
degradation ladder instead of failing the request, and the answer lists its rungs:

    cached_user_features  the online store failed: the user's last read features
    fewer_candidates      retrieval ran late: only the top candidates are scored
    ann_order             scoring failed or ran late: ANN order instead of the model
    cached_response       no candidates: the user's last full-quality answer
    popular_items         nothing personal left: the most popular unseen items

The candidate RPC and the online store each sit behind a circuit breaker, so a
dead dependency costs one fast refusal per request instead of a timeout.

A request takes one loaded artifact set (``_Loaded``) when it starts and uses only
it: its features, item table and model, and a Retrieve pinned to its version. A new
set goes live (``reload``) only once the candidate service holds it too, so index,
model and features change as one unit and no request mixes versions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from features.definitions import USER_VIEW, VIEWS
from features.item_table import ItemTable, load_item_table
from features.reader import FeatureFrame, OnlineReader, open_reader
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.features import ITEM_INPUTS, MODEL_FEATURES, USER_INPUTS, assemble, with_popular
from ranker.history import ShownHistory, open_history
from ranker.rerank import Slate, item_attributes, run_chain
from ranker.resilience import Breaker, Deadlines, TtlCache
from ranker.response_cache import CachedAnswer, ResponseCache, open_response_cache
from ranker.scorer import OnnxScorer, providers, replace_nonfinite
from sieve import artifacts
from sieve.artifacts import release_off_loop
from sieve.batcher import MicroBatcher, per_group
from sieve.data import GENRE_INDEX
from sieve.errors import ArtifactError, InvalidRequest, NotReady
from sieve.ids import IdIndex
from sieve.metrics import BREAKER_STATE, NONFINITE_FEATURES
from sieve.validation import id_list

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankQuery:
    user_id: int
    k: int
    exclude: np.ndarray  # int64
    debug: bool


def parse_rank(req: sieve_pb2.RankRequest, config: RankerConfig) -> RankQuery:
    """Validate a RankRequest (k=0 means the default).

    Raises:
        InvalidRequest: saying which field is wrong and what is allowed.
    """
    if req.user_id <= 0:
        raise InvalidRequest(f"user_id must be a positive integer, got {req.user_id}")
    k = req.k or config.default_k
    if not 1 <= k <= config.max_k:
        raise InvalidRequest(
            f"k must be in 1..{config.max_k} (0 for {config.default_k}), got {req.k}"
        )
    exclude = id_list(req.exclude_item_ids, config.max_exclude, "exclude_item_ids")
    return RankQuery(req.user_id, k, exclude, req.debug)


@dataclass
class RankResult:
    item_ids: np.ndarray
    final_scores: np.ndarray
    candidate_scores: np.ndarray
    model_scores: np.ndarray
    candidate_ranks: np.ndarray
    version: str
    timings: list[tuple[str, int]] = field(default_factory=list)
    degradations: list[str] = field(default_factory=list)
    rungs: list[str] = field(default_factory=list)
    """The degradation-ladder rungs taken, in ladder order; empty: full quality."""
    moved_by: list[list[str]] = field(default_factory=list)  # debug: per returned item
    dropped: list[tuple[int, str, str, float]] = field(default_factory=list)
    """debug: (item id, rule, reason, model score)."""


class _Rows(NamedTuple):
    """A request's candidates as the model sees them."""

    ids: np.ndarray  # int64
    scores: np.ndarray  # ANN scores, float32
    ranks: np.ndarray  # ANN ranks (-1: a popular item the search missed)
    rows: np.ndarray  # rows of the item table
    x: np.ndarray  # model inputs [n, MODEL_FEATURES]
    n_bad: int  # non-finite inputs replaced by defaults


_T = TypeVar("_T")


def score_batch(items: list[tuple[OnnxScorer, np.ndarray]]) -> list[np.ndarray]:
    """Score the rows of several requests with one model call per scorer.

    Rows are grouped by scorer, so requests that started before a model swap are
    never scored by the new model (or the reverse).
    """

    def one_call(scorer: OnnxScorer, blocks: list[np.ndarray]) -> list[np.ndarray]:
        scores = scorer.score(np.concatenate(blocks))
        return np.split(scores, np.cumsum([len(b) for b in blocks])[:-1])

    return per_group(items, one_call)


class _Clock:
    def __init__(self, start: float | None = None) -> None:
        self.start = self.last = time.perf_counter() if start is None else start
        self.marks: list[tuple[str, int]] = []

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.marks.append((stage, int((now - self.last) * 1e6)))
        self.last = now

    def total(self) -> list[tuple[str, int]]:
        return [*self.marks, ("total", int((time.perf_counter() - self.start) * 1e6))]


@dataclass(frozen=True)
class _Loaded:
    """Everything one artifact version serves with, swapped as a unit."""

    version: str
    reader: OnlineReader
    items: ItemTable
    scorer: OnnxScorer
    popular: np.ndarray  # item table rows, most popular first
    popular_ids: np.ndarray  # the same, as item ids
    feature_defaults: np.ndarray  # float32 [F]: what a non-finite feature value becomes
    embeddings: np.ndarray  # float32 [n, d], catalog order, memory-mapped
    catalog: IdIndex  # item id -> row of ``embeddings``
    n_popular: int  # popular unseen items added to the ANN candidates
    registry_mtime: float
    registry_path: Path
    popular_embeddings: np.ndarray  # float32 [<= POPULAR_HEAD, d] of popular_ids' head


POPULAR_HEAD = 4096
"""Embeddings of this many of the most popular items are kept in memory, gathered
once per set: the popular candidates of a request come from them."""


def _popularity_order(items: ItemTable) -> tuple[np.ndarray, np.ndarray]:
    """(item table rows, item ids), most popular first."""
    rows = np.argsort(-items.columns["log_popularity"], kind="stable")
    return rows, items.ids[rows]


def _embeddings_of(state: _Loaded, item_ids: np.ndarray) -> np.ndarray:
    """Embeddings of catalog items (ids the catalog lacks get zeros)."""
    return _embeddings_by_id(state.embeddings, state.catalog, item_ids)


def _embeddings_by_id(embeddings: np.ndarray, catalog: IdIndex, item_ids: np.ndarray) -> np.ndarray:
    """Rows of ``embeddings`` (catalog order) for ``item_ids``, in memory; zeros
    for ids the catalog lacks."""
    rows, found = catalog.rows(item_ids)
    out = np.take(embeddings, rows, axis=0).astype(np.float32, copy=False)
    out[~found] = 0.0
    return out


def _popular_of(
    items: ItemTable, embeddings: np.ndarray, catalog: IdIndex
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_popularity_order`` of ``items`` and the embeddings of its first
    ``POPULAR_HEAD`` ids (blocking: call it from a worker thread)."""
    popular, popular_ids = _popularity_order(items)
    return popular, popular_ids, _embeddings_by_id(embeddings, catalog, popular_ids[:POPULAR_HEAD])


def touch_pages(array: np.ndarray, page_bytes: int = 4096) -> None:
    """Read one value per memory page of ``array`` (a memory-mapped file), so the
    process has every page mapped before requests need them."""
    flat = array.reshape(-1)
    step = max(1, page_bytes // flat.itemsize)
    float(np.asarray(flat[::step]).sum())


def _history_down(e: BaseException) -> str:
    log.warning("shown-history store failed: %s: %s", type(e).__name__, e)
    return f"history_unavailable: {type(e).__name__}; fatigue used no history"


def _scoring_failed(e: BaseException) -> str:
    log.warning("scoring failed: %s: %s", type(e).__name__, e)
    return f"ann_order: scoring failed: {_failure(e)}"


def _failure(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "deadline"
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code().name
    return type(e).__name__


def candidate_channel_options(retries: int) -> list[tuple[str, object]]:
    """Channel options for the candidate service: gRPC's own retry policy for
    Retrieve (UNAVAILABLE only, exponential backoff with jitter, never past the
    call's deadline), and reconnects within a second of the service coming back
    (gRPC's default backoff grows to two minutes)."""
    options: list[tuple[str, object]] = [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # (not grpc.min_reconnect_backoff_ms: it is also the connect timeout, and a
        # handshake slower than it would fail)
    ]
    if retries > 0:
        policy = {
            "maxAttempts": retries + 1,
            "initialBackoff": "0.002s",
            "maxBackoff": "0.02s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        service = sieve_pb2.DESCRIPTOR.services_by_name["CandidateService"].full_name
        config = {"methodConfig": [{"name": [{"service": service}], "retryPolicy": policy}]}
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    return options


def _attribute_of(state: _Loaded, item_ids: np.ndarray, name: str) -> np.ndarray:
    """An item table column for ``item_ids`` (ids the table lacks are left out)."""
    rows, found = state.items.rows(item_ids)
    return state.items.columns[name][rows[found]]


class RankPipeline:
    def __init__(self, config: RankerConfig, artifacts_root: Path) -> None:
        self.config = config
        self.artifacts_root = Path(artifacts_root)
        self.nonfinite_feature_values = 0  # replaced by defaults since start (a metric)
        cuda = "CUDAExecutionProvider" in providers()
        on = config.score_batching == "on" or (config.score_batching == "auto" and cuda)
        self.score_batcher: MicroBatcher[tuple[OnnxScorer, np.ndarray], np.ndarray] | None = (
            MicroBatcher(
                score_batch,
                config.score_batch_max_requests,
                config.score_batch_max_wait_us,
                config.score_batch_max_queue,
                config.score_batch_concurrency,
            )
            if on
            else None
        )
        self.rules = config.rerank.rules
        self._rule_attributes = item_attributes(self.rules)
        # What users were shown recently, only when a rule reads it.
        self.history: ShownHistory | None = (
            open_history(config.rerank.history)
            if any(r.name == "fatigue" for r in self.rules)
            else None
        )
        rel = config.reliability
        self.reliability = rel
        self.breakers = {
            name: Breaker(name, rel.breaker, BREAKER_STATE.labels(name).set)
            for name in ("candidate", "online_store")
        }
        for name in self.breakers:
            BREAKER_STATE.labels(name).set(0)
        # Users' last read features, served when the online store fails.
        self.user_cache: TtlCache[int, FeatureFrame] = TtlCache(
            rel.user_cache_size, rel.user_cache_ttl_s
        )
        self.response_cache: ResponseCache | None = open_response_cache(rel.response_cache)
        self._read_retry = Retry(
            ExponentialWithJitterBackoff(cap=0.005, base=0.001), rel.redis_retries
        )
        self._background: set[asyncio.Task[None]] = set()  # response-cache writes
        self._state: _Loaded | None = None
        # A new set loaded by reload(), waiting for the candidate service to hold it.
        self._pending: _Loaded | None = None
        self._refused = ""  # a version that failed to load, skipped until CURRENT moves on
        self._reload_lock = asyncio.Lock()
        # Requests running per reader (id), so a retired set's reader is closed only
        # after its last request; _idle wakes the retiring reload when one drains.
        self._in_flight: dict[int, int] = {}
        self._idle: dict[int, asyncio.Event] = {}
        self._channel: grpc.aio.Channel | None = None
        self._stub: sieve_pb2_grpc.CandidateServiceStub | None = None
        # A request's CPU work runs here, not on the event loop (None: on the loop).
        self._cpu: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(rel.cpu_threads, "rank-cpu") if rel.cpu_threads else None
        )

    async def on_cpu(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on the request path's CPU threads (``reliability.cpu_threads``),
        so the event loop stays free to take calls, shed them and move bytes while
        it runs; on the loop itself when there are none."""
        if self._cpu is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    @property
    def version(self) -> str:
        return self._state.version if self._state else ""

    async def start(self) -> None:
        """Load the artifact set, open the store and the candidate channel, warm up.

        Raises:
            ArtifactError: naming the missing or corrupt file.
        """
        self._state = await self._load(artifacts.load(self.artifacts_root))
        self._channel = grpc.aio.insecure_channel(
            self.config.candidate_address,
            options=candidate_channel_options(self.reliability.retrieve_retries),
        )
        self._stub = sieve_pb2_grpc.CandidateServiceStub(self._channel)
        self._warm_up(self._state)
        if self.score_batcher is not None:
            self.score_batcher.start()

    def _warm_up(self, state: _Loaded) -> None:
        x = np.zeros((self.config.num_candidates, len(MODEL_FEATURES)), np.float32)
        for _ in range(3):
            state.scorer.score(x)

    async def reload(self) -> bool:
        """Go live with the set ``CURRENT`` names, if it is new, as one unit.

        The new set is loaded beside the live one (once: it waits in ``_pending``
        across calls), then goes live only when the candidate service answers a
        Retrieve pinned to its version; until then this returns False and the next
        call probes again. The swap is one assignment; the old set's reader is
        closed after the requests that took it have finished. A set that fails to
        load is refused (logged, once) and the live one keeps serving.

        Returns:
            Whether a new set went live.
        """
        async with self._reload_lock:
            state = self._state
            if state is None:
                return False
            try:
                target = artifacts.current_version(self.artifacts_root)
            except ArtifactError as e:
                log.error("artifact reload: %s; still serving %s", e, state.version)
                return False
            pending = self._pending
            if pending is not None and pending.version != target:
                # CURRENT moved on before the candidate service caught up: drop it
                # (no request ever took it).
                log.info("dropped %s (never live): CURRENT names %s", pending.version, target)
                self._pending = None
                await pending.reader.close()
                pending = None
            if target in (state.version, self._refused):
                return False
            if pending is None:
                try:
                    pending = await self._load(artifacts.load(self.artifacts_root, target))
                except ArtifactError as e:
                    self._refused = target
                    log.error(
                        "refused artifact set %s: %s; still serving %s", target, e, state.version
                    )
                    return False
                await asyncio.to_thread(self._warm_up, pending)
                self._pending = pending
                log.info(
                    "ranker loaded %s beside %s; it goes live once the candidate service holds it",
                    target,
                    state.version,
                )
            if not await self._candidate_holds(pending):
                return False
            self._pending = None
            old, self._state = self._state, pending
            log.info("ranker swapped artifact set: %s -> %s", state.version, pending.version)
            if old is not None:
                await self._retire(old)
                retired: list[Any] = [old]
                del old, state
                await release_off_loop(retired)
            return True

    async def _candidate_holds(self, state: _Loaded) -> bool:
        """Whether the candidate service answers a Retrieve pinned to ``state.version``
        (k=1, a unit vector of the set's dimension). FAILED_PRECONDITION: not yet."""
        stub = self._stub
        if stub is None:
            return False
        probe = np.zeros(int(state.embeddings.shape[1]), np.float32)
        probe[0] = 1.0
        try:
            resp = await stub.Retrieve(
                sieve_pb2.RetrieveRequest(
                    user_vector=sieve_pb2.UserVector(values=probe),
                    k=1,
                    artifact_version=state.version,
                ),
                timeout=self.config.retrieve_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                log.warning(
                    "candidate probe for %s failed: %s %s",
                    state.version,
                    e.code().name,
                    e.details(),
                )
            return False
        return resp.artifact_version == state.version

    async def _retire(self, state: _Loaded) -> None:
        """Close ``state``'s reader once no request that took it is running."""
        key = id(state.reader)
        if self._in_flight.get(key):
            idle = self._idle.setdefault(key, asyncio.Event())
            await idle.wait()
        await state.reader.close()

    async def _load(self, aset: artifacts.ArtifactSet) -> _Loaded:
        model = aset.manifest["model"]
        for key, kind in (("features", list), ("input_name", str), ("output_name", str)):
            if not isinstance(model.get(key), kind):
                raise ArtifactError(
                    f"{aset.root / artifacts.MANIFEST}: model lacks {key!r} "
                    f"(a {kind.__name__}), got {model.get(key)!r}"
                )
        if list(model["features"]) != list(MODEL_FEATURES):
            raise ArtifactError(
                f"{aset.root / artifacts.MANIFEST}: model features {model['features']} are not "
                f"the features this ranker computes {list(MODEL_FEATURES)}"
            )
        role = {"fp32": "model", "int8": "model_int8"}[self.config.model]
        if role not in aset.manifest["files"]:
            raise ArtifactError(
                f"{aset.root / artifacts.MANIFEST} has no {role} file (ranker.model = "
                f"{self.config.model!r}); rebuild the set or serve 'fp32'"
            )
        # Checksums of every file read here (1.5 GB of embeddings at 1M items) are
        # computed off the event loop: a reload must not stall the live requests.
        roles = (role, "feature_store", "catalog", "item_embeddings")
        paths = await asyncio.to_thread(lambda: {r: aset.verified(r) for r in roles})
        scorer = OnnxScorer(
            str(paths[role]),
            model["input_name"],
            model["output_name"],
            model["features"],
            self.config.intra_op_threads,
        )
        await asyncio.to_thread(scorer.load)
        repo = paths["feature_store"].parent
        reader = open_reader(
            repo, self.reliability.redis_pool_size, self.reliability.redis_timeout_s
        )
        await reader.start()
        try:
            await asyncio.to_thread(reader.prepare, VIEWS)
            return await self._state_of(aset, paths, model, scorer, reader, repo)
        except BaseException:
            await reader.close()  # a refused set leaves no open connection behind
            raise

    async def _state_of(
        self,
        aset: artifacts.ArtifactSet,
        paths: dict[str, Path],
        model: dict[str, Any],
        scorer: OnnxScorer,
        reader: OnlineReader,
        repo: Path,
    ) -> _Loaded:
        """The rest of a set's state: item table, popularity, embeddings, read
        through ``reader`` from the ``paths`` already verified (sorting and file
        reads in a worker thread).

        Raises:
            ArtifactError: the store holds no items, or the embeddings do not fit.
        """
        try:
            catalog = await asyncio.to_thread(
                pd.read_parquet, paths["catalog"], columns=["item_id"]
            )
            catalog_ids = catalog["item_id"].to_numpy(np.int64)
        except (pa.ArrowException, OSError, KeyError, ValueError, TypeError) as e:
            raise ArtifactError(
                f"catalog file {paths['catalog']} has no readable item_id column: {e}"
            ) from e
        items = await load_item_table(
            reader, catalog_ids, repo, self.config.item_load_process_min_items
        )
        if len(items) == 0:
            raise ArtifactError(f"online store of {repo} holds no item features (materialized?)")
        for i, name, groups in self._rule_attributes:
            col = items.columns.get(name)
            if col is None or (groups and col.ndim != 1):
                one_d = sorted(c for c, v in items.columns.items() if v.ndim == 1)
                raise ArtifactError(
                    f"ranker.rerank.rules[{i}] ({self.rules[i].name}) reads item attribute "
                    f"{name!r}, which the item features of {repo} lack; one of {one_d}"
                )
        registry = repo / "registry.db"
        mtime = registry.stat().st_mtime if registry.exists() else 0.0
        log.info("ranker loaded %s: %d items, model %s", aset.version, len(items), scorer.path)
        defaults = np.asarray(
            model.get("feature_defaults", [0.0] * len(MODEL_FEATURES)), np.float32
        )
        # A plain ndarray over the mapping: np.memmap's own indexing costs Python
        # calls on every gather.
        embeddings = np.asarray(np.load(paths["item_embeddings"], mmap_mode="r"))
        if embeddings.ndim != 2 or embeddings.shape[0] != len(catalog_ids):
            raise ArtifactError(
                f"{aset.path('item_embeddings')} has {embeddings.shape[0]} rows, "
                f"the catalog {len(catalog_ids)}"
            )
        dim = aset.manifest["index"].get("dim")
        if embeddings.shape[1] != dim:
            raise ArtifactError(
                f"{aset.path('item_embeddings')} holds {embeddings.shape[1]}-dim vectors; "
                f"the manifest's index has dim {dim}"
            )
        # Map every page now: requests gather ~400 random rows (popular candidates,
        # MMR), and each first touch of a page is a fault (~1 ms per 200 rows at 1M).
        await asyncio.to_thread(touch_pages, embeddings)
        catalog = await asyncio.to_thread(IdIndex, catalog_ids)
        popular, popular_ids, head = await asyncio.to_thread(
            _popular_of, items, embeddings, catalog
        )
        return _Loaded(
            version=aset.version,
            reader=reader,
            items=items,
            scorer=scorer,
            popular=popular,
            popular_ids=popular_ids,
            feature_defaults=defaults,
            embeddings=embeddings,
            catalog=catalog,
            n_popular=int(model.get("popular_candidates", 0)),
            registry_mtime=mtime,
            registry_path=registry,
            popular_embeddings=head,
        )

    async def refresh_item_features(self, force: bool = False) -> bool:
        """Reload the in-process item table when Feast's registry changed (a new
        materialization landed). Returns whether a reload happened."""
        state = self._state
        if state is None:
            return False
        mtime = state.registry_path.stat().st_mtime if state.registry_path.exists() else 0.0
        if not force and mtime == state.registry_mtime:
            return False
        items = await load_item_table(
            state.reader,
            state.items.ids,
            state.registry_path.parent,
            self.config.item_load_process_min_items,
        )
        popular, popular_ids, head = await asyncio.to_thread(
            _popular_of, items, state.embeddings, state.catalog
        )
        if self._state is not state:
            return False  # a reload swapped sets meanwhile: this table is of the old one
        self._state = dataclasses.replace(
            state,
            items=items,
            popular=popular,
            popular_ids=popular_ids,
            popular_embeddings=head,
            registry_mtime=mtime,
        )
        return True

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)
        if self.score_batcher is not None:
            await self.score_batcher.stop()
        if self._channel is not None:
            await self._channel.close()
        if self._state is not None:
            await self._state.reader.close()
        if self._pending is not None:
            await self._pending.reader.close()
            self._pending = None
        if self.history is not None:
            await self.history.close()
        if self.response_cache is not None:
            await self.response_cache.close()
        if self._cpu is not None:
            self._cpu.shutdown(wait=False)  # drained: the server stopped taking calls

    async def rank(self, q: RankQuery, time_left_s: float | None = None) -> RankResult:
        """Rank for one user with the set live when the request starts, end to end.

        ``time_left_s``: the caller's deadline (None: none); every stage ends in time
        to leave the later ones their budgets, taking the next rung when it cannot.

        Raises:
            NotReady: before ``start``.
        """
        state, stub = self._state, self._stub
        if state is None or stub is None:
            raise NotReady("ranker is not loaded yet")
        deadlines = Deadlines(self.reliability.budget_ms, time.perf_counter(), time_left_s)
        key = id(state.reader)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            return await self._rank(state, stub, q, deadlines)
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
                idle = self._idle.pop(key, None)
                if idle is not None:
                    idle.set()

    async def _rank(
        self,
        state: _Loaded,
        stub: sieve_pb2_grpc.CandidateServiceStub,
        q: RankQuery,
        deadlines: Deadlines,
    ) -> RankResult:
        # The shown-history read needs only the user id: it runs beside the user
        # features and the retrieval instead of as a round trip of the re-rank line.
        history = self.history
        shown = asyncio.ensure_future(history.recent(q.user_id)) if history is not None else None
        try:
            return await self._rank_with(state, stub, q, deadlines, shown)
        finally:
            if shown is not None:
                if not shown.done():
                    shown.cancel()  # a rung before the re-rank: not needed
                elif not shown.cancelled():
                    shown.exception()  # seen, so asyncio does not log it as lost

    async def _rank_with(
        self,
        state: _Loaded,
        stub: sieve_pb2_grpc.CandidateServiceStub,
        q: RankQuery,
        deadlines: Deadlines,
        shown: asyncio.Future[np.ndarray] | None,
    ) -> RankResult:
        clock = _Clock(deadlines.start)
        clock.mark("validate")
        rungs: list[str] = []
        degradations: list[str] = []

        user, failed = await self._user_features(state, q.user_id, deadlines)
        clock.mark("user_features")
        if failed:
            degradations.append(failed)
            if user is None:
                return await self._fallback(state, q, clock, rungs, degradations, deadlines)
            rungs.append("cached_user_features")
        assert user is not None
        if not user.found[0]:
            degradations.append(f"cold_start_user: no features for user {q.user_id}")
            return self._popular(state, q, clock, rungs, degradations)

        seen = user.lists("seen_item_ids")[0]
        exclude = np.union1d(seen, q.exclude)
        vector = user.array("user_vector")[0]
        resp, failed = await self._retrieve(state, stub, vector, exclude, deadlines)
        clock.mark("retrieve")
        if resp is None:
            degradations.append(failed)
            return await self._fallback(state, q, clock, rungs, degradations, deadlines)
        if resp.artifact_version != state.version:  # a safety net: the Retrieve was pinned
            degradations.append(
                f"version_mismatch: candidate {resp.artifact_version}, ranker {state.version}"
            )

        rows_of = (state, resp, exclude, vector, user, deadlines, rungs, degradations)
        if self.score_batcher is None:  # both stages in one trip to the CPU thread

            def rows_then_scores() -> tuple[_Rows, tuple[np.ndarray | None, str]]:
                cand = self._model_rows(*rows_of)
                clock.mark("item_features")
                scored = self._score_here(state, cand.x, deadlines)
                clock.mark("score")
                return cand, scored

            cand, (model_scores, failed) = await self.on_cpu(rows_then_scores)
        else:
            cand = await self.on_cpu(self._model_rows, *rows_of)
            clock.mark("item_features")
            model_scores, failed = await self._score_batched(state, cand.x, deadlines)
            clock.mark("score")
        if cand.n_bad:
            self.nonfinite_feature_values += cand.n_bad
            NONFINITE_FEATURES.inc(cand.n_bad)
        if model_scores is None:
            rungs.append("ann_order")
            degradations.append(failed)

        recent = np.empty(0, np.int64)
        history = self.history
        if history is not None and shown is not None:
            try:
                async with asyncio.timeout(max(0.0, deadlines.left("rerank"))):
                    recent = await shown
            except Exception as e:  # noqa: BLE001 - fatigue is never worth a failed Rank
                degradations.append(_history_down(e))
                history = None  # nor worth a second timeout on the write
        result = await self.on_cpu(
            self._rerank,
            state,
            q,
            cand,
            model_scores,
            exclude,
            recent,
            rungs,
            degradations,
        )
        if history is not None:
            # awaited: the next page, maybe on another replica, must see this one
            try:
                await history.record(q.user_id, result.item_ids)
            except Exception as e:  # noqa: BLE001
                degradations.append(_history_down(e))
        if not rungs and self.response_cache is not None:
            answer = CachedAnswer(
                result.item_ids,
                result.final_scores,
                result.candidate_scores,
                result.model_scores,
                result.candidate_ranks,
            )
            self._in_background(
                self.response_cache.put(state.version, q.user_id, answer), "response-cache write"
            )
        clock.mark("rerank")
        result.timings = clock.total()
        return result

    def _rerank(
        self,
        state: _Loaded,
        q: RankQuery,
        cand: _Rows,
        model_scores: np.ndarray | None,
        exclude: np.ndarray,
        recent: np.ndarray,
        rungs: list[str],
        degradations: list[str],
    ) -> RankResult:
        """The rule chain over the scored candidates, and the answer it makes (CPU
        only: runs on ``on_cpu``)."""
        cand_ids, cand_scores, cand_ranks, rows = cand.ids, cand.scores, cand.ranks, cand.rows
        slate = Slate(
            ids=cand_ids,
            attributes=state.items.take([name for _, name, _ in self._rule_attributes], rows),
            embeddings_of=lambda idx: _embeddings_of(state, cand_ids[idx]),
            attribute_of=lambda ids, name: _attribute_of(state, ids, name),
            exclude=exclude,
            recent=recent,
            categories=GENRE_INDEX,
        )
        order_by = cand_scores if model_scores is None else model_scores
        out = run_chain(self.rules, slate, order_by, q.k, explain=q.debug)
        chosen = out.chosen
        degradations += out.notes
        if len(chosen) < q.k:
            degradations.append(f"short_list: only {len(chosen)} candidates for k={q.k}")
        shown_model = np.zeros(len(cand_ids), np.float32) if model_scores is None else model_scores
        result = RankResult(
            item_ids=cand_ids[chosen],
            final_scores=out.final_scores,
            candidate_scores=cand_scores[chosen],
            model_scores=shown_model[chosen],
            candidate_ranks=cand_ranks[chosen].astype(np.int32),
            version=state.version,
            degradations=degradations,
            rungs=rungs,
            moved_by=out.moved_by,
            dropped=[
                (int(cand_ids[i]), rule, why, float(shown_model[i])) for i, rule, why in out.dropped
            ],
        )
        return result

    def _model_rows(
        self,
        state: _Loaded,
        resp: sieve_pb2.RetrieveResponse,
        exclude: np.ndarray,
        vector: np.ndarray,
        user: FeatureFrame,
        deadlines: Deadlines,
        rungs: list[str],
        degradations: list[str],
    ) -> _Rows:
        """The candidates (ANN + popular), cut to the best by ANN when retrieval ran
        late, with their item-table rows and model inputs (CPU only: runs on
        ``on_cpu``)."""
        cand_ids, cand_scores, cand_ranks = with_popular(
            np.asarray(resp.item_ids, np.int64),
            np.asarray(resp.scores, np.float32),
            state.popular_ids,
            exclude,
            state.n_popular,
            vector,
            lambda ids: _embeddings_of(state, ids),
            state.popular_embeddings,
        )
        budget = self.reliability.budget_ms
        left = deadlines.left("score")
        n_keep = self.reliability.degraded_candidates
        need = 1.5 * (budget.item_features + budget.score) / 1e3
        if left < need and len(cand_ids) > n_keep:
            # Retrieval ran late (with the default budgets: past 20 ms), or the
            # caller's deadline is short: under 1.5x the item-feature and score lines
            # are left. Score only the best by ANN, so the later stages fit.
            keep = np.sort(np.argsort(-cand_scores, kind="stable")[:n_keep])
            rungs.append("fewer_candidates")
            degradations.append(
                f"fewer_candidates: {left * 1e3:.1f} ms left for item features and scoring; "
                f"scored the top {n_keep} of {len(cand_ids)} candidates by ANN score"
            )
            cand_ids, cand_scores, cand_ranks = cand_ids[keep], cand_scores[keep], cand_ranks[keep]
        rows, found = state.items.rows(cand_ids)
        if not found.all():
            degradations.append(f"missing_item_features: {int((~found).sum())} candidates dropped")
            cand_ids, cand_scores, rows = cand_ids[found], cand_scores[found], rows[found]
            cand_ranks = cand_ranks[found]
        x = assemble(
            cand_scores,
            cand_ranks,
            {name: user.array(name) for name in USER_INPUTS},
            state.items.take(ITEM_INPUTS, rows),
        )

        n_bad = replace_nonfinite(x, state.feature_defaults)
        if n_bad:
            degradations.append(f"nonfinite_features: {n_bad} values scored with defaults")
        return _Rows(cand_ids, cand_scores, cand_ranks, rows, x, n_bad)

    async def _user_features(
        self, state: _Loaded, user_id: int, deadlines: Deadlines
    ) -> tuple[FeatureFrame | None, str]:
        """The user's features, and "" or what went wrong.

        From the online store (behind the ``online_store`` breaker, idempotent
        reads retried with backoff and jitter, all within the stage's deadline);
        when that fails, the copy the last good read left in the user cache
        (None when there is none).
        """
        breaker = self.breakers["online_store"]
        ids = np.array([user_id], np.int64)
        left = deadlines.left("user_features")
        if left <= 0:  # the caller's deadline leaves no time: not the store's fault
            why = "user_features_failed: no time left"
        elif breaker.allow():
            try:
                async with asyncio.timeout(left):
                    user = await self._read_retry.call_with_retry(
                        lambda: state.reader.read(USER_VIEW, ids), lambda _: None
                    )
            except Exception as e:  # noqa: BLE001 - a failed store read degrades
                breaker.failure()
                log.warning("user features failed: %s: %s", type(e).__name__, e)
                why = f"user_features_failed: {_failure(e)}"
            else:
                breaker.success()
                if user.found[0]:
                    self.user_cache.put(user_id, user)
                return user, ""
        else:
            why = "user_features_failed: online_store breaker open"
        cached = self.user_cache.get(user_id)
        return cached, why + ("; served the last read features" if cached is not None else "")

    async def _retrieve(
        self,
        state: _Loaded,
        stub: sieve_pb2_grpc.CandidateServiceStub,
        vector: np.ndarray,
        exclude: np.ndarray,
        deadlines: Deadlines,
    ) -> tuple[sieve_pb2.RetrieveResponse | None, str]:
        """The ANN candidates (behind the ``candidate`` breaker, within the stage's
        deadline), or None and why not."""
        breaker = self.breakers["candidate"]
        if not breaker.allow():
            return None, "retrieve_failed: candidate breaker open"
        left = deadlines.left("retrieve")
        if left <= 0:
            return None, "retrieve_failed: no time left for retrieval"
        try:
            resp = await stub.Retrieve(
                sieve_pb2.RetrieveRequest(
                    user_vector=sieve_pb2.UserVector(values=vector),
                    k=self.config.num_candidates,
                    exclude_item_ids=exclude,
                    artifact_version=state.version,  # the index of this request's set
                ),
                timeout=left,
            )
        except grpc.aio.AioRpcError as e:
            log.warning("Retrieve failed: %s %s", e.code().name, e.details())
            why = e.code().name
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # e.g. the candidate service restarted and no longer holds our
                # version: the service answers, so the breaker stays as it is
                breaker.success()
                return None, f"retrieve_failed: {why} ({e.details()})"
            breaker.failure()
            return None, f"retrieve_failed: {why}"
        breaker.success()
        return resp, ""

    def _no_time_to_score(self, deadlines: Deadlines) -> str:
        """Why not to score ("" to score): under a quarter of the score line is left
        before the stage's deadline."""
        left = deadlines.left("score")
        if left < self.reliability.budget_ms.score / 4e3:
            return f"ann_order: {left * 1e3:.1f} ms left to score"
        return ""

    def _score_here(
        self, state: _Loaded, x: np.ndarray, deadlines: Deadlines
    ) -> tuple[np.ndarray | None, str]:
        """Model scores of the rows ``x`` by a model call on this thread (no batcher),
        or None and why not (the caller orders by ANN score instead): no time to
        score, or the model failed."""
        why = self._no_time_to_score(deadlines)
        if why:
            return None, why
        try:
            return state.scorer.score(x), ""
        except Exception as e:  # noqa: BLE001 - ANN order beats a failed Rank
            return None, _scoring_failed(e)

    async def _score_batched(
        self, state: _Loaded, x: np.ndarray, deadlines: Deadlines
    ) -> tuple[np.ndarray | None, str]:
        """Model scores of the rows ``x`` through the batcher, or None and why not
        (the caller orders by ANN score instead): no time to score, the batcher's
        queue is full or its wait ran out, or the model failed."""
        assert self.score_batcher is not None
        why = self._no_time_to_score(deadlines)
        if why:
            return None, why
        try:
            async with asyncio.timeout(deadlines.left("score")):
                return await self.score_batcher.submit((state.scorer, x)), ""
        except Exception as e:  # noqa: BLE001 - ANN order beats a failed Rank
            return None, _scoring_failed(e)

    def _in_background(self, write: Coroutine[Any, Any, None], what: str) -> None:
        """Run a best-effort write off the request path (a failure is logged)."""

        async def run() -> None:
            try:
                await write
            except Exception as e:  # noqa: BLE001
                log.warning("%s failed: %s: %s", what, type(e).__name__, e)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fallback(
        self,
        state: _Loaded,
        q: RankQuery,
        clock: _Clock,
        rungs: list[str],
        degradations: list[str],
        deadlines: Deadlines,
    ) -> RankResult:
        """No candidates: the user's last full-quality answer, else popular items."""
        cache = self.response_cache
        if cache is not None:
            try:
                async with asyncio.timeout(max(0.0, deadlines.left("rerank"))):
                    answer = await cache.get(state.version, q.user_id)
            except Exception as e:  # noqa: BLE001
                log.warning("response cache failed: %s: %s", type(e).__name__, e)
                answer = None
            if answer is not None:
                keep = ~np.isin(answer.ids, q.exclude)
                if keep.sum() >= q.k:
                    take = np.flatnonzero(keep)[: q.k]
                    rungs.append("cached_response")
                    clock.mark("fallback")
                    return RankResult(
                        item_ids=answer.ids[take],
                        final_scores=answer.final[take],
                        candidate_scores=answer.candidate[take],
                        model_scores=answer.model[take],
                        candidate_ranks=answer.ranks[take],
                        version=state.version,
                        timings=clock.total(),
                        degradations=degradations,
                        rungs=rungs,
                    )
        return self._popular(state, q, clock, rungs, degradations)

    def _popular(
        self,
        state: _Loaded,
        q: RankQuery,
        clock: _Clock,
        rungs: list[str],
        degradations: list[str],
    ) -> RankResult:
        """The last rung: the most popular items the caller did not exclude."""
        rows = state.popular
        if len(q.exclude):
            rows = rows[~np.isin(state.items.ids[rows], q.exclude)]
        rows = rows[: q.k]
        pop = state.items.columns["log_popularity"][rows]
        zeros = np.zeros(len(rows), np.float32)
        rungs.append("popular_items")
        clock.mark("fallback")
        return RankResult(
            item_ids=state.items.ids[rows],
            final_scores=pop.astype(np.float32),
            candidate_scores=zeros,
            model_scores=zeros,
            candidate_ranks=np.full(len(rows), -1, np.int32),
            version=state.version,
            timings=clock.total(),
            degradations=degradations,
            rungs=rungs,
        )
