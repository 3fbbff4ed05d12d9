"""The ranker gRPC service (the entry point): a thin adapter around ``RankPipeline``."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.pipeline import RankPipeline, parse_rank
from sieve.config import RankerConfig
from sieve.errors import grpc_errors
from sieve.grpc_server import Server

log = logging.getLogger(__name__)
SERVICE_NAME = sieve_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name


class RankerServicer(sieve_pb2_grpc.RankerServiceServicer):
    def __init__(self, config: RankerConfig, pipeline: RankPipeline) -> None:
        self.config = config
        self.pipeline = pipeline

    @grpc_errors
    async def Rank(
        self, request: sieve_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> sieve_pb2.RankResponse:
        result = await self.pipeline.rank(parse_rank(request, self.config))
        return sieve_pb2.RankResponse(
            items=[
                sieve_pb2.RankedItem(
                    item_id=int(i),
                    final_score=float(f),
                    candidate_score=float(c),
                    model_score=float(m),
                    candidate_rank=int(r),
                    moved_by=result.moved_by[n] if result.moved_by else (),
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
        )


async def create_server(config: RankerConfig, artifacts_root: Path) -> tuple[Server, RankPipeline]:
    """Start the ranker server (NOT_SERVING), load and warm up, then SERVING.

    Raises:
        ArtifactError: artifacts missing or corrupt; the server is stopped first.
    """
    pipeline = RankPipeline(config, artifacts_root)
    server = Server(SERVICE_NAME, config.host, config.port)
    server.every(config.item_refresh_s, pipeline.refresh_item_features, "item feature refresh")
    server.every(config.reload_check_s, pipeline.reload, "artifact reload")
    server.on_stop(pipeline.close)
    sieve_pb2_grpc.add_RankerServiceServicer_to_server(
        RankerServicer(config, pipeline), server.server
    )
    await server.start_serving(pipeline.start)
    return server, pipeline
