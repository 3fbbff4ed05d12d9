"""The ranker gRPC service (the entry point): a thin adapter around ``RankPipeline``."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from redis.exceptions import RedisError

from features.events import parse_events
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.context import parse_rank
from ranker.ladder import RUNGS
from ranker.pipeline import RankPipeline
from ranker.sources import source_names
from sieve.auth import current_caller
from sieve.errors import (
    ConfigError,
    InvalidRequest,
    NotReady,
    Overloaded,
    PermissionDenied,
    grpc_errors,
)
from sieve.grpc_server import Server, add_servicer
from sieve.logs import new_request_id
from sieve.metrics import (
    CALLS_BY_CALLER,
    EVENTS_RECORDED,
    IN_FLIGHT,
    IN_FLIGHT_LIMIT,
    RANK_ANSWERS,
    RANK_RUNGS,
)
from sieve.tls import warn_if_exposed

log = logging.getLogger(__name__)
SERVICE_NAME = sieve_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name
for _rung in RUNGS:  # every series exists from the start (at 0), so a rate() is defined
    RANK_RUNGS.labels(_rung)


class RankerServicer(sieve_pb2_grpc.RankerServiceServicer):
    def __init__(self, config: RankerConfig, pipeline: RankPipeline) -> None:
        self.config = config
        self.pipeline = pipeline
        self.limit = pipeline.limit
        IN_FLIGHT_LIMIT.set(self.limit.limit)
        self.in_flight = 0

    @grpc_errors
    async def Rank(
        self, request: sieve_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> sieve_pb2.RankResponse:
        request_id = new_request_id(context.invocation_metadata())
        if request.debug and not current_caller().debug:
            raise PermissionDenied(
                f"caller {current_caller().identity} may not ask for debug (ranker.auth)"
            )
        limit = self.limit.limit
        if self.in_flight >= limit:
            # Shed at once, before any work: the accepted calls keep their latency.
            RANK_ANSWERS.labels("shed").inc()
            raise Overloaded(
                f"the ranker is serving {self.in_flight} Rank calls, its limit now {limit} "
                f"(ranker.reliability.max_in_flight {self.limit.max_limit}, "
                f"adaptive_in_flight {self.limit.adaptive}); retry with backoff"
            )
        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            result = await self.pipeline.rank(
                parse_rank(request, self.config),
                context.time_remaining(),
                context.invocation_metadata() if self.pipeline.tracer is not None else None,
            )
        except InvalidRequest:
            RANK_ANSWERS.labels("invalid").inc()
            raise
        except BaseException:
            RANK_ANSWERS.labels("error").inc()
            raise
        finally:
            in_flight = self.in_flight
            self.in_flight -= 1
            IN_FLIGHT.dec()
        self.limit.answered(result.out_of_time, in_flight)  # congestion, even when fixed
        IN_FLIGHT_LIMIT.set(self.limit.limit)
        RANK_ANSWERS.labels("degraded" if result.rungs or result.degradations else "full").inc()
        CALLS_BY_CALLER.labels("ranker", current_caller().label, "ok").inc()
        for rung in result.rungs:
            RANK_RUNGS.labels(rung).inc()
        names = [source_names(int(b)) for b in result.sources]
        return sieve_pb2.RankResponse(
            items=[
                sieve_pb2.RankedItem(
                    item_id=int(i),
                    final_score=float(f),
                    candidate_score=float(c),
                    model_score=float(m),
                    candidate_rank=int(r),
                    moved_by=result.moved_by[n] if result.moved_by else (),
                    sources=names[n] if names else (),
                )
                for n, (i, f, c, m, r) in enumerate(
                    zip(
                        result.item_ids,
                        result.final_scores,
                        result.candidate_scores,
                        result.model_scores,
                        result.candidate_ranks,
                        strict=True,
                    )
                )
            ],
            dropped=[
                sieve_pb2.DroppedItem(item_id=i, rule=rule, reason=why, model_score=score)
                for i, rule, why, score in result.dropped
            ],
            timings=[sieve_pb2.StageTiming(stage=s, micros=us) for s, us in result.timings],
            artifact_version=result.version,
            degradations=result.degradations,
            rungs=result.rungs,
            request_id=request_id,
        )

    @grpc_errors
    async def RecordEvents(
        self, request: sieve_pb2.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> sieve_pb2.RecordEventsResponse:
        stream = self.pipeline.events
        if stream is None:
            raise ConfigError(
                "this ranker does not take events: set [ranker.events] enabled = true "
                "(and its redis_url) and restart it"
            )
        try:
            entries = parse_events(request, self.config.events.max_future_s)
        except InvalidRequest:
            EVENTS_RECORDED.labels("invalid").inc(len(request.events))
            raise
        try:
            await stream.append(entries)
        except RedisError as e:
            EVENTS_RECORDED.labels("unavailable").inc(len(entries))
            log.warning("events: append failed: %s: %s", type(e).__name__, e)
            raise NotReady(
                f"the event stream is unavailable ({type(e).__name__}); the batch is not "
                "acknowledged: retry it (events are applied once per event_id)"
            ) from None
        EVENTS_RECORDED.labels("accepted").inc(len(entries))
        return sieve_pb2.RecordEventsResponse(accepted=len(entries))


async def create_server(config: RankerConfig, artifacts_root: Path) -> tuple[Server, RankPipeline]:
    """Start the ranker server (NOT_SERVING), load and warm up, then SERVING.

    Raises:
        ArtifactError: artifacts missing or corrupt; the server is stopped first.
    """
    pipeline = RankPipeline(config, artifacts_root)
    warn_if_exposed("ranker", config.host, config.tls)
    server = Server(
        SERVICE_NAME,
        config.host,
        config.port,
        config.reliability.accepted_bound,
        config.max_connection_age_s,
        config.grace_s,
        config.tls,
        (config.auth, config.rate_limit, "ranker"),
    )
    server.every(config.item_refresh_s, pipeline.refresh_item_features, "item feature refresh")
    server.every(config.reload_check_s, pipeline.reload, "artifact reload")
    server.on_stop(pipeline.close)
    server.serve_metrics(config.reliability.metrics_port)
    add_servicer(server.server, RankerServicer(config, pipeline), sieve_pb2, "RankerService")
    await server.start_serving(pipeline.start)
    return server, pipeline
