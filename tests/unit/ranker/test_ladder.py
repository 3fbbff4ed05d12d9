"""The per-request context and the degradation ladder's decisions, without servers."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from ranker import ladder
from ranker.config import ReliabilityConfig
from ranker.context import RankContext, RankQuery
from ranker.resilience import Deadlines


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def context(k: int = 3, exclude: tuple[int, ...] = (), clock: Clock | None = None) -> RankContext:
    """A request's context; its deadlines start now on the real clock (``Deadlines``
    reads ``time.perf_counter``), its stage times on ``clock`` when given."""
    query = RankQuery(7, k, np.array(exclude, np.int64), False)
    if clock is None:
        return RankContext(query, Deadlines(ReliabilityConfig().budget_ms, time.perf_counter()))
    return RankContext(query, Deadlines(ReliabilityConfig().budget_ms, clock.now), clock)


def test_the_context_records_stage_times_rungs_and_degradations() -> None:
    clock = Clock()
    ctx = context(clock=clock)
    clock.now += 0.0625  # binary fractions: exact microseconds
    ctx.mark("user_features")
    clock.now += 0.125
    ctx.mark("retrieve")
    ctx.note("cold_start_user: no features")
    assert ctx.full_quality
    ctx.take("ann_order", "ann_order: 1.0 ms left to score")
    assert not ctx.full_quality
    assert ctx.rungs == ["ann_order"]
    assert ctx.degradations == ["cold_start_user: no features", "ann_order: 1.0 ms left to score"]
    result = ctx.answer(*(np.zeros(2),) * 4, np.zeros(2, np.int32), "v1")
    clock.now += 0.25
    ctx.finish(result, "rerank")
    assert result.timings == [
        ("user_features", 62500),
        ("retrieve", 125000),
        ("rerank", 250000),
        ("total", 437500),
    ]
    assert result.rungs is ctx.rungs and result.degradations is ctx.degradations


def test_fewer_candidates_below_one_and_a_half_lines_of_item_features_and_score() -> None:
    rel = ReliabilityConfig()  # item features 6 ms + score 10 ms: 24 ms needed
    assert ladder.fewer_candidates(0.0239, rel, 1200)
    assert not ladder.fewer_candidates(0.0241, rel, 1200)
    assert not ladder.fewer_candidates(0.001, rel, rel.degraded_candidates)  # already few


def test_no_time_to_score_below_a_quarter_of_the_score_line() -> None:
    rel = ReliabilityConfig()  # score line 10 ms
    assert ladder.no_time_to_score(0.0024, rel) == "ann_order: 2.4 ms left to score"
    assert ladder.no_time_to_score(0.0026, rel) == ""


async def test_failures_are_named_in_one_word() -> None:
    assert ladder.failure(TimeoutError()) == "deadline"
    assert ladder.failure(KeyError("x")) == "KeyError"
    # a real status from a real channel: nothing listens on port 1
    async with grpc.aio.insecure_channel("127.0.0.1:1") as ch:
        call = ch.unary_unary("/x.Y/Z")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(b"", timeout=1.0)
    assert ladder.failure(e.value) == "UNAVAILABLE"


def _popular_set() -> SimpleNamespace:
    ids = np.array([10, 11, 12, 13, 14], np.int64)
    pop = np.array([0.5, 2.0, 1.0, 3.0, 0.1], np.float32)
    order = np.argsort(-pop, kind="stable")
    items = SimpleNamespace(ids=ids, columns={"log_popularity": pop})
    return SimpleNamespace(version="v1", popular=order, items=items)


def test_popular_items_are_the_last_rung_without_the_excluded() -> None:
    ctx = context(k=3, exclude=(13,))
    result = ladder.popular(_popular_set(), ctx)  # type: ignore[arg-type]
    assert result.item_ids.tolist() == [11, 12, 10]
    assert result.final_scores.tolist() == [2.0, 1.0, 0.5]
    assert result.candidate_ranks.tolist() == [-1, -1, -1]
    assert result.rungs == ["popular_items"] and result.timings[0][0] == "fallback"


class Cache:
    def __init__(self, answer: object | None) -> None:
        self.answer = answer

    async def get(self, version: str, user_id: int) -> object | None:
        await asyncio.sleep(0)
        return self.answer


async def test_the_fallback_serves_the_last_good_answer_else_popular_items() -> None:
    answer = SimpleNamespace(
        ids=np.array([5, 6, 7, 8], np.int64),
        final=np.array([4.0, 3.0, 2.0, 1.0], np.float32),
        candidate=np.ones(4, np.float32),
        model=np.ones(4, np.float32),
        ranks=np.arange(4, dtype=np.int32),
    )
    ctx = context(k=3, exclude=(6,))
    result = await ladder.fallback(_popular_set(), ctx, Cache(answer))  # type: ignore[arg-type]
    assert result.item_ids.tolist() == [5, 7, 8] and result.rungs == ["cached_response"]
    # too few left after the exclusions: popular items instead
    ctx = context(k=4, exclude=(6,))
    result = await ladder.fallback(_popular_set(), ctx, Cache(answer))  # type: ignore[arg-type]
    assert result.rungs == ["popular_items"] and len(result.item_ids) == 4
    ctx = context(k=2)
    result = await ladder.fallback(_popular_set(), ctx, None)
    assert result.rungs == ["popular_items"] and result.item_ids.tolist() == [13, 11]
