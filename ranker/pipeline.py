"""The ranker's request path, stage by stage, in one place.

    Rank(user) -> user features (online store)
               -> the user tower (ONNX) over the user's last items: the learned vector
               -> one Retrieve over gRPC for both spaces: the learned one (1,200) and
                  the text one (100, in ``more``), seen items excluded in the search
               -> + item-to-item neighbours of the last items (100), popular (100)
                  (the quotas of the set's manifest; these are the defaults)
               -> item features (in-process table), cross features
               -> score (ONNX Runtime)
               -> re-rank: the rule chain of ``ranker.rerank`` -> k items

Each stage is timed; what the request had to give up is listed as a degradation.
Every stage has a deadline (``ranker.reliability.budget_ms``, bounded by the
caller's own deadline); a stage that fails or overruns takes the next rung of the
degradation ladder (``ranker/ladder.py``) instead of failing the request. The
candidate RPC and the online store each sit behind a circuit breaker, so a dead
dependency costs one fast refusal per request instead of a timeout.

A request takes one loaded artifact set (``ranker/loaded.py``) when it starts and
uses only it: its features, item table and model, and a Retrieve pinned to its
version. A new set goes live only once the candidate service holds it too
(``sieve/versions.py`` holds the sets), so no request mixes versions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from features.events import (
    EVENT_VIEWS,
    USER_EVENTS_VIEW,
    EventStream,
    ensure_events_repo,
    with_events,
)
from features.item_table import ReadingChild
from features.reader import FeatureFrame, OnlineReader, open_reader
from ranker import ladder, stages
from ranker.candidates import CandidateClient
from ranker.config import RankerConfig
from ranker.context import RankContext, RankQuery, RankResult
from ranker.device import onnx_cuda
from ranker.feature_log import FeatureLog
from ranker.history import ShownHistory, open_history
from ranker.loaded import LoadedSet, load_set, refreshed
from ranker.rerank import item_attributes
from ranker.resilience import STAGES, Breaker, Deadlines, InFlightLimit, TtlCache
from ranker.response_cache import CachedAnswer, ResponseCache, open_response_cache
from ranker.scatter import ShardedCandidates
from ranker.scorer import OnnxScorer
from sieve import artifacts
from sieve.auth import current_caller
from sieve.batcher import MicroBatcher
from sieve.device import decide
from sieve.logs import REQUEST_ID, requests
from sieve.metrics import NONFINITE_FEATURES, RANK_STAGE_SECONDS, exemplar
from sieve.tracing import open_tracer
from sieve.versions import VersionHolder

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class RankPipeline:
    """The funnel over the artifact set live when each request starts.

    Constructed with the config (nothing is opened); ``start()`` loads the live
    set and opens the candidate channel; ``reload()`` goes live with a new set;
    ``close()`` releases everything.
    """

    def __init__(self, config: RankerConfig, artifacts_root: Path) -> None:
        self.config = config
        self.artifacts_root = Path(artifacts_root)
        rel = self.reliability = config.reliability
        self.nonfinite_feature_values = 0  # replaced by defaults since start (a metric)
        on_batching = "score batching " + ("on" if config.score_batching == "on" else "off")
        # Decided once, here: ``gpu`` without a CUDA that answers refuses to start.
        self.on_gpu = decide("ranker.device", config.device, onnx_cuda, on_batching)
        on = config.score_batching == "on" or (config.score_batching == "auto" and self.on_gpu)
        self.score_batcher: MicroBatcher[tuple[OnnxScorer, np.ndarray], np.ndarray] | None = (
            MicroBatcher(
                stages.score_batch,
                config.score_batch_max_requests,
                config.score_batch_max_wait_us,
                config.score_batch_max_queue,
                config.score_batch_concurrency,
            )
            if on
            else None
        )
        self.rules = config.rerank.rules
        self._rule_columns = [name for _, name, _ in item_attributes(self.rules)]
        # What users were shown recently, only when a rule reads it.
        self.history: ShownHistory | None = (
            open_history(config.rerank.history)
            if any(r.name == "fatigue" for r in self.rules)
            else None
        )
        # Learned from the answers by the service (ranker/service.py): the bound on
        # calls in flight, and whether this ranker is congested (then a Retrieve
        # past its deadline says nothing about the candidate service).
        self.limit = InFlightLimit(
            min(rel.min_in_flight, rel.max_in_flight),
            rel.max_in_flight,
            adaptive=rel.adaptive_in_flight,
        )
        self.tracer = open_tracer(config.tracing, "sieve-ranker")
        self.candidates: CandidateClient | ShardedCandidates = (
            ShardedCandidates(config, lambda: self.limit.congested, self.tracer)
            if config.candidate_shards
            else CandidateClient(config, lambda: self.limit.congested, tracer=self.tracer)
        )
        self.store_breaker = Breaker.reported("online_store", rel.breaker)
        # Users' last read features, served when the online store fails.
        self.user_cache: TtlCache[int, FeatureFrame] = TtlCache(
            rel.user_cache_size, rel.user_cache_ttl_s
        )
        self.response_cache: ResponseCache | None = open_response_cache(rel.response_cache)
        self._read_retry = Retry(
            ExponentialWithJitterBackoff(cap=0.005, base=0.001), rel.redis_retries
        )
        self._background: set[asyncio.Task[None]] = set()  # response-cache writes
        self.feature_log = FeatureLog(config.feature_log) if config.feature_log.sample > 0 else None
        # The feedback loop (start opens them when [ranker.events] is on).
        self.events: EventStream | None = None
        self.events_reader: OnlineReader | None = None
        self.sets: VersionHolder[LoadedSet] = VersionHolder(
            self.artifacts_root,
            self._load,
            keep=1,
            ready=lambda s: self.candidates.holds(s.version, s.dim),
            close=lambda s: s.reader.close(),
            name="ranker",
            logger=log,
        )
        # Reads large item tables in child processes (features/item_table.py).
        self._child = ReadingChild()
        # A request's CPU work runs here, not on the event loop (None: on the loop).
        self._cpu: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(rel.cpu_threads, "rank-cpu") if rel.cpu_threads else None
        )

    async def _load(self, version: str) -> LoadedSet:
        aset = artifacts.load(self.artifacts_root, version)
        return await load_set(aset, self.config, self.rules, self._child, self.on_gpu)

    async def on_cpu(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on the request path's CPU threads (``reliability.cpu_threads``),
        so the event loop stays free to take calls, shed them and move bytes while
        it runs; on the loop itself when there are none."""
        if self._cpu is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    @property
    def version(self) -> str:
        return self.sets.version

    async def start(self) -> None:
        """Load the artifact set, open the store and the candidate channel, warm up.

        Raises:
            ArtifactError: naming the missing or corrupt file.
        """
        await asyncio.to_thread(self._child.start)  # while this process is small
        await self.sets.start()
        if self.config.events.enabled:
            await self._start_events()
        self.candidates.start()
        if self.score_batcher is not None:
            self.score_batcher.start()

    async def _start_events(self) -> None:
        """The event stream, and the reader of the events views (their Feast repo
        made from the live set's online store when it does not exist yet).

        Raises:
            ArtifactError: the events repo cannot be made or read.
            redis.RedisError: the stream's Redis does not answer.
        """
        cfg = self.config.events
        live = self.sets.live
        assert live is not None
        repo = await asyncio.to_thread(
            ensure_events_repo, self.artifacts_root, live.registry_path.parent, cfg.feast_project
        )
        rel = self.reliability
        reader = open_reader(repo, rel.redis_pool_size, rel.redis_timeout_s)
        await reader.start()
        await asyncio.to_thread(reader.prepare, EVENT_VIEWS)
        self.events_reader = reader
        self.events = EventStream(cfg)
        await self.events.start()

    async def reload(self) -> bool:
        """Go live with the set ``CURRENT`` names, if it is new, as one unit: it is
        loaded beside the live one and goes live only when the candidate service
        answers a Retrieve pinned to its version (``VersionHolder.reload``).

        Returns:
            Whether a new set went live.
        """
        return await self.sets.reload()

    async def refresh_item_features(self, force: bool = False) -> bool:
        """Reload the in-process item table when Feast's registry changed (a new
        materialization landed). Returns whether a reload happened."""
        state = self.sets.live
        if state is None:
            return False
        fresh = await refreshed(state, self.config, self._child, force)
        return fresh is not None and self.sets.replace(state, fresh)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)
        if self.score_batcher is not None:
            await self.score_batcher.stop()
        await self.candidates.close()
        await self.sets.close()
        if self.history is not None:
            await self.history.close()
        if self.events is not None:
            await self.events.close()
        if self.feature_log is not None:
            await asyncio.to_thread(self.feature_log.close)
        if self.events_reader is not None:
            await self.events_reader.close()
        if self.response_cache is not None:
            await self.response_cache.close()
        if self._cpu is not None:
            self._cpu.shutdown(wait=False)  # drained: the server stopped taking calls
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # flush what is batched

    async def rank(
        self, q: RankQuery, time_left_s: float | None = None, metadata: Any = None
    ) -> RankResult:
        """Rank for one user with the set live when the request starts, end to end.

        ``time_left_s``: the caller's deadline (None: none); every stage ends in time
        to leave the later ones their budgets, taking the next rung when it cannot.
        ``metadata``: the call's, for its ``traceparent`` when tracing is on.

        Raises:
            NotReady: before ``start``.
        """
        tracer = self.tracer
        if tracer is None:
            return observed(await self._rank(q, time_left_s), q)
        with tracer.server_span(
            "Rank", metadata, **{"rpc.system": "grpc", "rpc.method": "Rank", "sieve.k": q.k}
        ) as span:
            start_ns = time.time_ns()
            result = await self._rank(q, time_left_s)
            if span.is_recording():
                span.set_attribute("sieve.artifact_version", result.version)
                span.set_attribute("sieve.rungs", list(result.rungs))
                for rung, why in zip(result.rungs, result.degradations, strict=False):
                    span.add_event("rung", {"sieve.rung": rung, "sieve.why": why[:200]})
                budget = self.reliability.budget_ms
                at, deadlines = budget.headroom, {}
                for stage in STAGES:
                    at += getattr(budget, stage)
                    deadlines[stage] = at
                marks = [(s, us) for s, us in result.timings if s != "total"]
                tracer.stage_spans(span, start_ns, marks, deadlines, frozenset({"retrieve"}))
            return observed(result, q)  # inside the span: its trace id is the exemplar

    async def _rank(self, q: RankQuery, time_left_s: float | None) -> RankResult:
        deadlines = Deadlines(self.reliability.budget_ms, time.perf_counter(), time_left_s)
        with self.sets.use() as state:
            ctx = RankContext(q, deadlines)
            # The shown-history read needs only the user id: it runs beside the user
            # features and the retrieval instead of as a round trip of the re-rank.
            history = self.history
            shown = asyncio.ensure_future(history.recent(q.user_id)) if history else None
            # So is the read of what the user's events changed since the build.
            events = (
                asyncio.ensure_future(self._user_events(q.user_id))
                if self.events_reader is not None
                else None
            )
            try:
                return await self._funnel(state, ctx, shown, events)
            finally:
                for side in (shown, events):
                    if side is not None:
                        if not side.done():
                            side.cancel()  # a rung before it was needed
                        elif not side.cancelled():
                            side.exception()  # seen, so asyncio does not log it as lost

    async def _user_events(self, user_id: int) -> FeatureFrame | None:
        """The events view's row of the user; None when the read fails (the Rank goes
        on with the build's features, noted as ``events_unavailable``)."""
        assert self.events_reader is not None
        try:
            return await self.events_reader.read(USER_EVENTS_VIEW, np.array([user_id], np.int64))
        except Exception as e:  # noqa: BLE001 - fresher features are optional
            log.warning("events view read failed: %s: %s", type(e).__name__, e)
            return None

    async def _await_events(
        self, ctx: RankContext, events: asyncio.Future[FeatureFrame | None]
    ) -> FeatureFrame | None:
        """The events read (started beside the user features), waited for until the
        user-features stage's deadline, and at least ``read_wait_ms``: a busy loop
        that answers it late must not make the answer forget the user's events."""
        cfg = self.config.events
        wait = max(ctx.deadlines.left("user_features"), cfg.read_wait_ms / 1000)
        try:
            fresh = await asyncio.wait_for(asyncio.shield(events), wait)
        except TimeoutError:
            ctx.note(f"events_unavailable: the events read was not back in {wait * 1e3:.1f} ms")
            return None
        if fresh is None:
            ctx.note("events_unavailable: the events read failed; ranked on the build's features")
        return fresh

    async def _funnel(
        self,
        state: LoadedSet,
        ctx: RankContext,
        shown: asyncio.Future[np.ndarray] | None,
        events: asyncio.Future[FeatureFrame | None] | None = None,
    ) -> RankResult:
        """The stages in order; a stage with nothing to hand on ends on the ladder."""
        q, rel = ctx.query, self.reliability
        ctx.mark("validate")

        user = await stages.user_features(
            state, ctx, self.store_breaker, self._read_retry, self.user_cache
        )
        ctx.mark("user_features")
        if user is None:
            return await ladder.fallback(state, ctx, self.response_cache)
        if not user.found[0]:
            ctx.note(f"cold_start_user: no features for user {q.user_id}")
            return ladder.popular(state, ctx)
        if events is not None:
            fresh = await self._await_events(ctx, events)
            user = with_events(user, fresh, self.config.events.recent)

        exclude = np.union1d(user.lists("seen_item_ids")[0], q.exclude)
        vector = stages.request_vector(state, ctx, user)
        left = ctx.deadlines.left("retrieve")
        quotas = state.quotas
        more = []
        if quotas.get("text", 0) > 0:  # both spaces searched in one call
            text_vector = user.array("text_vector")[0]
            if np.isfinite(text_vector).all():  # a bad one must not fail the learned search
                more.append(("text", text_vector, quotas["text"]))
            else:
                ctx.note("text_source_failed: the user's text_vector is not finite")
        if self.tracer is None:
            resp, failed = await self.candidates.retrieve(
                state.version, vector, exclude, left, quotas.get("learned", 0), more=more
            )
        else:  # live, so the candidate service's spans join it (traceparent)
            with self.tracer.span("retrieve", **{"sieve.timeout_ms": round(left * 1e3, 3)}):
                resp, failed = await self.candidates.retrieve(
                    state.version, vector, exclude, left, quotas.get("learned", 0), more=more
                )
        ctx.mark("retrieve")
        if resp is None:
            ctx.out_of_time |= ladder.retrieve_starved(left, rel)
            ctx.note(failed)
            return await ladder.fallback(state, ctx, self.response_cache)
        if failed:  # some shards answered
            ctx.take("partial_candidates", failed)
        text = None
        if more:
            if len(resp.more) == len(more):
                text = resp.more[0]
            else:  # the other sources still answer
                ctx.note(
                    "text_source_failed: the candidate service answered no text search "
                    "(it predates RetrieveRequest.more)"
                )
        if resp.artifact_version != state.version:  # a safety net: the Retrieve was pinned
            ctx.note(f"version_mismatch: candidate {resp.artifact_version}, ranker {state.version}")

        batcher = self.score_batcher
        # The shown-history read went out beside the user features: when it is in
        # already (the usual case), re-ranking joins the same trip to the CPU thread.
        recent_in = shown is None or shown.done()
        recent = await self._recent(shown, ctx) if recent_in else None
        result: RankResult | None = None
        if batcher is None:  # the stages in one trip to the CPU thread

            def on_cpu_trip() -> tuple[stages.Rows, np.ndarray | None, RankResult | None]:
                cand = stages.candidate_rows(state, ctx, resp, text, exclude, vector, user, rel)
                ctx.mark("item_features")
                scores = stages.score_here(state, ctx, cand.x, rel)
                ctx.mark("score")
                if not recent_in:
                    return cand, scores, None
                return cand, scores, self._rerank(state, ctx, cand, scores, exclude, recent)

            cand, model_scores, result = await self.on_cpu(on_cpu_trip)
        else:
            cand = await self.on_cpu(
                stages.candidate_rows, state, ctx, resp, text, exclude, vector, user, rel
            )
            ctx.mark("item_features")
            model_scores = await stages.score_batched(batcher, state, ctx, cand.x, rel)
            ctx.mark("score")
        if self.feature_log is not None and self.feature_log.sampled():
            self.feature_log.put(
                REQUEST_ID.get(), q.user_id, state.version, state.scorer.features, cand
            )
        if cand.n_bad:
            self.nonfinite_feature_values += cand.n_bad
            NONFINITE_FEATURES.inc(cand.n_bad)
        if result is None:
            if not recent_in:
                recent = await self._recent(shown, ctx)
            result = await self.on_cpu(
                self._rerank, state, ctx, cand, model_scores, exclude, recent
            )
        if recent is not None:  # a history that failed is not worth a second timeout
            await self._record(q.user_id, result.item_ids, ctx)
        if ctx.full_quality and self.response_cache is not None:
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
        return ctx.finish(result, "rerank")

    def _rerank(
        self,
        state: LoadedSet,
        ctx: RankContext,
        cand: stages.Rows,
        model_scores: np.ndarray | None,
        exclude: np.ndarray,
        recent: np.ndarray | None,
    ) -> RankResult:
        return stages.rerank(
            state, ctx, self.rules, self._rule_columns, cand, model_scores, exclude,
            np.empty(0, np.int64) if recent is None else recent,
        )  # fmt: skip

    @staticmethod
    async def _recent(
        shown: asyncio.Future[np.ndarray] | None, ctx: RankContext
    ) -> np.ndarray | None:
        """What the user was shown recently; None when there is no history, or it
        failed or ran past the re-rank's deadline (fatigue is never worth a failed
        Rank)."""
        if shown is None:
            return None
        try:
            async with asyncio.timeout(max(0.0, ctx.deadlines.left("rerank"))):
                return await shown
        except Exception as e:  # noqa: BLE001
            ctx.note(_history_down(e))
            return None

    async def _record(self, user_id: int, item_ids: np.ndarray, ctx: RankContext) -> None:
        """Remember what this answer shows (awaited: the next page, maybe on another
        replica, must see it)."""
        if self.history is None:
            return
        try:
            await self.history.record(user_id, item_ids)
        except Exception as e:  # noqa: BLE001
            ctx.note(_history_down(e))

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


def _history_down(e: BaseException) -> str:
    log.warning("shown-history store failed: %s: %s", type(e).__name__, e)
    return f"history_unavailable: {type(e).__name__}; fatigue used no history"


def observed(result: RankResult, q: RankQuery) -> RankResult:
    """``result``'s stage times in ``sieve_rank_stage_seconds`` (with the sampled
    trace's id as the exemplar, when there is one), and its ``request`` log line
    when this call is in the sample."""
    ex = exemplar()
    for stage, micros in result.timings:
        RANK_STAGE_SECONDS.labels(stage).observe(micros / 1e6, ex)
    request_log = requests()
    if request_log.sampled():
        request_log.request(
            "Rank",
            q.user_id,
            caller=current_caller().label,
            k=q.k,
            version=result.version,
            items=len(result.item_ids),
            rungs=list(result.rungs),
            degradations=len(result.degradations),
            stage_ms={s: round(us / 1000, 3) for s, us in result.timings},
        )
    return result
