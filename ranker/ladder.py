"""The degradation ladder: what a Rank gives up, in order, instead of failing.

    cached_user_features  the online store failed: the user's last read features
    stored_user_vector    the user tower failed: the build's vector of the user
    partial_candidates    a shard of a sharded index failed or ran late: the others'
    fewer_candidates      retrieval ran late: only the top candidates are scored
    ann_order             scoring failed or ran late: ANN order instead of the model
    cached_response       no candidates: the user's last full-quality answer
    popular_items         nothing personal left: the most popular unseen items

The decisions here are pure (time left against the budget lines); the two last
rungs make whole answers.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np

from ranker.config import ReliabilityConfig
from ranker.context import RankContext, RankResult
from ranker.loaded import LoadedSet
from ranker.response_cache import ResponseCache
from ranker.sources import BIT

log = logging.getLogger(__name__)

RUNGS = ("cached_user_features", "stored_user_vector", "partial_candidates", "fewer_candidates",
         "ann_order", "cached_response", "popular_items")  # fmt: skip
"""The rungs, in ladder order."""


def failure(e: BaseException) -> str:
    """A failure in one word for a degradation: ``deadline``, a gRPC status name,
    or the exception's type."""
    if isinstance(e, TimeoutError):
        return "deadline"
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code().name
    return type(e).__name__


def fewer_candidates(left_s: float, rel: ReliabilityConfig, n: int) -> bool:
    """Whether to score only the best ``rel.degraded_candidates`` of ``n``
    candidates: under 1.5x the item-feature and score lines are left before the
    score stage's deadline (with the default budgets: retrieval ended past 20 ms,
    or the caller's deadline is short)."""
    need = 1.5 * (rel.budget_ms.item_features + rel.budget_ms.score) / 1e3
    return left_s < need and n > rel.degraded_candidates


def retrieve_starved(left_s: float, rel: ReliabilityConfig) -> bool:
    """Whether a Retrieve was given less than the stage's own budget: this request's
    queueing used the rest, so its failure says nothing about the candidate service."""
    return left_s < rel.budget_ms.retrieve / 1e3


def no_time_to_score(left_s: float, rel: ReliabilityConfig) -> str:
    """Why not to score ("" to score): under a quarter of the score line is left
    before the stage's deadline."""
    if left_s < rel.budget_ms.score / 4e3:
        return f"ann_order: {left_s * 1e3:.1f} ms left to score"
    return ""


def scoring_failed(e: BaseException) -> str:
    log.warning("scoring failed: %s: %s", type(e).__name__, e)
    return f"ann_order: scoring failed: {failure(e)}"


async def fallback(state: LoadedSet, ctx: RankContext, cache: ResponseCache | None) -> RankResult:
    """No candidates: the user's last full-quality answer, else popular items."""
    q = ctx.query
    if cache is not None:
        try:
            async with asyncio.timeout(max(0.0, ctx.deadlines.left("rerank"))):
                answer = await cache.get(state.version, q.user_id)
        except Exception as e:  # noqa: BLE001
            log.warning("response cache failed: %s: %s", type(e).__name__, e)
            answer = None
        if answer is not None:
            keep = ~np.isin(answer.ids, q.exclude)
            if keep.sum() >= q.k:
                take = np.flatnonzero(keep)[: q.k]
                ctx.rungs.append("cached_response")
                result = ctx.answer(
                    answer.ids[take],
                    answer.final[take],
                    answer.candidate[take],
                    answer.model[take],
                    answer.ranks[take],
                    state.version,
                )
                return ctx.finish(result, "fallback")
    return popular(state, ctx)


def popular(state: LoadedSet, ctx: RankContext) -> RankResult:
    """The last rung: the most popular items the caller did not exclude."""
    q = ctx.query
    rows = state.popular
    if len(q.exclude):
        rows = rows[~np.isin(state.items.ids[rows], q.exclude)]
    rows = rows[: q.k]
    pop = state.items.columns["log_popularity"][rows]
    zeros = np.zeros(len(rows), np.float32)
    ctx.rungs.append("popular_items")
    result = ctx.answer(
        state.items.ids[rows],
        pop.astype(np.float32),
        zeros,
        zeros,
        np.full(len(rows), -1, np.int32),
        state.version,
        sources=np.full(len(rows), BIT["popular"], np.uint8),
    )
    return ctx.finish(result, "fallback")
