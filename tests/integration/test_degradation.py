"""The degradation ladder, breakers and load shedding through real Rank calls.

A ranker talks to its own candidate server through a loopback proxy that can add
latency (benchmarks/faultproxy.py); the candidate server can be stopped and
started again on the same port. No component is mocked.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from candidate.config import CandidateConfig
from candidate.service import create_server as create_candidate
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker import stages
from ranker.config import BreakerConfig, RankerConfig, ReliabilityConfig, StageBudgetMs
from ranker.context import RankContext, RankQuery
from ranker.features import MODEL_FEATURES
from ranker.pipeline import RankPipeline
from ranker.resilience import Deadlines
from ranker.service import create_server as create_ranker
from sieve.faultproxy import DelayProxy
from sieve.grpc_server import Server
from tests.conftest import STATELESS, until


@dataclass
class Rig:
    ranker: str
    proxy: DelayProxy
    pipeline: RankPipeline
    server: Server
    candidate: Server
    candidate_port: int
    metrics_url: str


async def rank(address: str, timeout: float = 10.0, **kw) -> sieve_pb2.RankResponse:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(address) as ch:
        return await sieve_pb2_grpc.RankerServiceStub(ch).Rank(
            sieve_pb2.RankRequest(**kw), timeout=timeout
        )


def metric(url: str, name: str) -> float:
    """One sample of the ranker's /metrics (a line ``name value``)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(f"{name} not in /metrics")


async def full_quality(rig: Rig, user_id: int, k: int) -> sieve_pb2.RankResponse:
    """A full-quality answer for ``user_id``, once the fresh rig gives one: a new
    ranker's first calls (its first Retrieves through the proxy, its first model
    runs on real rows) can overrun the production budgets on a busy machine, and
    the tests here are about what happens after."""
    answers: list[sieve_pb2.RankResponse] = []

    async def full() -> bool:
        answers.append(await rank(rig.ranker, user_id=user_id, k=k))
        return list(answers[-1].rungs) == [] and len(answers[-1].items) == k

    await until(full, 10.0, f"a full-quality answer for user {user_id}")
    return answers[-1]


@pytest_asyncio.fixture(loop_scope="session")
async def rig_with(artifacts_root: Path) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    """A candidate server, a delay proxy in front of it, and a ranker with the
    given reliability settings (metrics on a free port)."""
    started: list[tuple[Server, Server, DelayProxy]] = []

    async def start(**reliability) -> Rig:  # type: ignore[no-untyped-def]
        cserver, _ = await create_candidate(CandidateConfig(port=0), artifacts_root)
        proxy = DelayProxy(f"127.0.0.1:{cserver.port}")
        pport = await proxy.start()
        cfg = RankerConfig(
            port=0,
            candidate_address=f"127.0.0.1:{pport}",
            item_refresh_s=0,
            reload_check_s=0,
            rerank=STATELESS,
            reliability=ReliabilityConfig(metrics_port=0, **reliability),
        )
        rserver, pipeline = await create_ranker(cfg, artifacts_root)
        started.append((rserver, cserver, proxy))
        return Rig(
            ranker=f"127.0.0.1:{rserver.port}",
            proxy=proxy,
            pipeline=pipeline,
            server=rserver,
            candidate=cserver,
            candidate_port=cserver.port,
            metrics_url=f"http://127.0.0.1:{rserver.metrics_port}/metrics",
        )

    yield start
    for rserver, _, proxy in started:
        await rserver.stop(0)
        await proxy.stop()
    for _, cserver, _ in started:
        await cserver.stop(0)


async def test_slow_candidate_degrades_opens_the_breaker_and_recovers(rig_with) -> None:  # type: ignore[no-untyped-def]
    rig = await rig_with(breaker=BreakerConfig(failures=3, open_s=0.3))
    full = await full_quality(rig, 42, 20)

    rig.proxy.delay_s = 0.2  # past the retrieve deadline (28 ms)
    again = await rank(rig.ranker, user_id=42, k=20)
    assert list(again.rungs) == ["cached_response"]
    assert again.degradations[0] == "retrieve_failed: DEADLINE_EXCEEDED"
    assert [i.item_id for i in again.items] == [i.item_id for i in full.items]
    fresh = await rank(rig.ranker, user_id=7, k=20)  # never answered: nothing cached
    assert list(fresh.rungs) == ["popular_items"] and len(fresh.items) == 20
    await rank(rig.ranker, user_id=8, k=20)  # the third failure in a row opens it
    assert metric(rig.metrics_url, 'sieve_breaker_state{dependency="candidate"}') == 1.0
    skipped = await rank(rig.ranker, user_id=42, k=20)
    assert skipped.degradations[0] == "retrieve_failed: candidate breaker open"
    assert list(skipped.rungs) == ["cached_response"]

    rig.proxy.delay_s = 0.0

    async def full_again() -> bool:
        return list((await rank(rig.ranker, user_id=42, k=20)).rungs) == []

    await until(full_again, 5.0, "full quality after the delay cleared")
    assert metric(rig.metrics_url, 'sieve_breaker_state{dependency="candidate"}') == 0.0


async def test_candidate_down_then_back_on_the_same_port(rig_with, artifacts_root) -> None:  # type: ignore[no-untyped-def]
    rig = await rig_with(breaker=BreakerConfig(failures=2, open_s=0.2))
    await full_quality(rig, 414, 10)
    await rig.candidate.stop(0)
    for user in (414, 5, 6):
        resp = await rank(rig.ranker, user_id=user, k=10)
        assert len(resp.items) == 10
        assert list(resp.rungs) == (["cached_response"] if user == 414 else ["popular_items"])
        assert resp.degradations[0].startswith("retrieve_failed: ")
    back, _ = await create_candidate(CandidateConfig(port=rig.candidate_port), artifacts_root)
    rig.candidate = back
    try:

        async def full_again() -> bool:
            return list((await rank(rig.ranker, user_id=5, k=10)).rungs) == []

        took = await until(full_again, 5.0, "full quality after the candidate came back")
        print(f"recovered {took:.2f} s after the candidate service came back")
    finally:
        await back.stop(0)


async def test_late_retrieval_scores_fewer_candidates(rig_with) -> None:  # type: ignore[no-untyped-def]
    # Lines of 200 ms for item features and scoring, no headroom: whenever
    # retrieval ends, under 1.5x (600 ms) of them is left, so the rung is taken.
    budget = StageBudgetMs(item_features=200.0, score=200.0, headroom=0.0)
    rig = await rig_with(budget_ms=budget, degraded_candidates=100)
    resp = await rank(rig.ranker, user_id=42, k=20, debug=True)
    assert list(resp.rungs) == ["fewer_candidates"] and len(resp.items) == 20
    assert "scored the top 100 of" in resp.degradations[0]
    # the 100 kept are the best by ANN score: ANN ranks 0..99 or popular items
    assert all(-1 <= i.candidate_rank < 100 for i in resp.items)
    full = await rig_with()
    assert list((await rank(full.ranker, user_id=42, k=20)).rungs) == []


async def test_a_short_caller_deadline_gets_an_answer_not_an_error(rig_with) -> None:  # type: ignore[no-untyped-def]
    rig = await rig_with()
    # 25 ms cannot hold the later stages' 32 ms of budgets: no stage is tried
    resp = await rank(rig.ranker, timeout=0.025, user_id=42, k=10)
    assert len(resp.items) == 10 and list(resp.rungs) == ["popular_items"]
    assert resp.degradations[0] == "user_features_failed: no time left"
    # 40 ms leaves retrieval until 18 ms and scoring until 34 ms: an answer, full
    # or with the rungs it took
    resp = await rank(rig.ranker, timeout=0.040, user_id=42, k=10)
    assert len(resp.items) == 10
    assert set(resp.rungs) <= {"fewer_candidates", "ann_order", "popular_items"}


async def test_scoring_without_time_left_falls_back_to_ann_order(rig_with) -> None:  # type: ignore[no-untyped-def]
    rig = await rig_with()
    state = rig.pipeline.sets.live
    assert state is not None
    x = np.zeros((10, len(MODEL_FEATURES)), np.float32)
    rel = rig.pipeline.reliability
    query = RankQuery(1, 10, np.empty(0, np.int64), False)
    late = RankContext(query, Deadlines(rel.budget_ms, start=time.perf_counter() - 1.0))
    scores = stages.score_here(state, late, x, rel)
    assert scores is None and late.rungs == ["ann_order"]
    assert late.degradations[0].startswith("ann_order: ")
    on_time = RankContext(query, Deadlines(rel.budget_ms, start=time.perf_counter()))
    scores = stages.score_here(state, on_time, x, rel)
    assert scores is not None and scores.shape == (10,) and on_time.degradations == []


async def _two_rank_calls_held(rig: Rig) -> list[asyncio.Task[sieve_pb2.RankResponse]]:
    """Two Rank calls held in flight by a 0.5 s delay on the candidate replies."""
    assert list((await rank(rig.ranker, user_id=1, k=10)).rungs) == []  # connected
    rig.proxy.delay_s = 0.5
    held = [asyncio.create_task(rank(rig.ranker, user_id=u, k=10)) for u in (1, 2)]

    async def both_in_flight() -> bool:
        return metric(rig.metrics_url, "sieve_rank_in_flight") == 2.0

    await until(both_in_flight, 5.0, "two Rank calls in flight")
    return held


async def test_past_max_in_flight_rank_is_shed_at_once(rig_with) -> None:  # type: ignore[no-untyped-def]
    rig = await rig_with(max_in_flight=2, budget_ms=StageBudgetMs(retrieve=2000.0))
    held = await _two_rank_calls_held(rig)
    shed_before = metric(rig.metrics_url, 'sieve_rank_answers_total{outcome="shed"}')
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rank(rig.ranker, user_id=3, k=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ranker.reliability.max_in_flight" in (err.value.details() or "")
    assert metric(rig.metrics_url, 'sieve_rank_answers_total{outcome="shed"}') == shed_before + 1
    for resp in await asyncio.gather(*held):  # the accepted ones are answered in full
        assert len(resp.items) == 10 and list(resp.rungs) == []
    rig.proxy.delay_s = 0.0


async def test_past_max_accepted_grpc_sheds_before_any_handler_runs(rig_with) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # max_accepted defaults to max_in_flight + 1: two Rank calls and one health
    # watch fill it, and a call past it is refused by gRPC's limiter, not by Rank
    rig = await rig_with(max_in_flight=2, budget_ms=StageBudgetMs(retrieve=2000.0))
    assert rig.pipeline.reliability.accepted_bound == 3
    held = await _two_rank_calls_held(rig)
    async with grpc.aio.insecure_channel(rig.ranker) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        shed_before = metric(rig.metrics_url, 'sieve_rank_answers_total{outcome="shed"}')
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rank(rig.ranker, user_id=3, k=10)
        watch.cancel()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ranker.reliability" not in (err.value.details() or "")  # not Rank's own answer
    assert metric(rig.metrics_url, 'sieve_rank_answers_total{outcome="shed"}') == shed_before
    for resp in await asyncio.gather(*held):  # the accepted ones are answered in full
        assert len(resp.items) == 10 and list(resp.rungs) == []
    rig.proxy.delay_s = 0.0


async def test_cpu_work_runs_off_the_event_loop_and_answers_the_same(  # type: ignore[no-untyped-def]
    rig_with, monkeypatch
) -> None:
    import threading

    import ranker.stages

    ran_on: dict[str, set[str]] = {}

    def spy(module: object, name: str) -> None:
        real = getattr(module, name)

        def wrapper(*args, **kw):  # type: ignore[no-untyped-def]
            ran_on.setdefault(name, set()).add(threading.current_thread().name)
            return real(*args, **kw)

        monkeypatch.setattr(module, name, wrapper)

    spy(ranker.stages, "assemble")  # model inputs, then scoring, in one trip
    spy(ranker.stages, "run_chain")  # the re-rank
    answers = {}
    for threads in (0, 1):
        rig = await rig_with(cpu_threads=threads)
        ran_on.clear()
        answers[threads] = [await rank(rig.ranker, user_id=u, k=20) for u in (1, 2, 3)]
        places = {name: sorted(t) for name, t in ran_on.items()}
        if threads:
            assert all(t[0].startswith("rank-cpu") and len(t) == 1 for t in places.values()), places
        else:
            assert all(t == ["MainThread"] for t in places.values()), places
        assert len(places) == 2
    for on_loop, off_loop in zip(answers[0], answers[1], strict=True):
        assert list(off_loop.rungs) == [] and list(on_loop.rungs) == []
        assert [i.item_id for i in off_loop.items] == [i.item_id for i in on_loop.items]
        assert [i.final_score for i in off_loop.items] == [i.final_score for i in on_loop.items]


async def test_stop_reports_not_serving_drains_then_lets_calls_finish(rig_with) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    rig = await rig_with(budget_ms=StageBudgetMs(retrieve=3000.0))
    assert list((await rank(rig.ranker, user_id=1, k=10)).rungs) == []  # connected
    rig.proxy.delay_s = 1.0
    held = asyncio.create_task(rank(rig.ranker, user_id=42, k=10))

    async def in_flight() -> bool:
        return metric(rig.metrics_url, "sieve_rank_in_flight") == 1.0

    await until(in_flight, 5.0, "a Rank call in flight")
    stopping = asyncio.create_task(rig.server.stop(grace_s=10.0, drain_s=0.5))
    async with grpc.aio.insecure_channel(rig.ranker) as ch:

        async def not_serving() -> bool:
            check = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            return bool(check.status == health_pb2.HealthCheckResponse.NOT_SERVING)

        await until(not_serving, 0.5, "NOT_SERVING while draining")
    await stopping  # drained, then waited for the call in flight
    resp = await held
    assert len(resp.items) == 10 and list(resp.rungs) == []  # it finished, in full
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await rank(rig.ranker, timeout=2.0, user_id=3, k=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("adaptive", [False, True])
async def test_a_burst_past_capacity_is_shed_and_not_blamed_on_the_candidate(  # type: ignore[no-untyped-def]
    rig_with, adaptive: bool
) -> None:
    """32 closed-loop callers, production budgets, a healthy candidate service.
    Before: Retrieves given the few ms the ranker's own queue left them ran out,
    counted as candidate failures, opened the breaker, and nearly every answer was
    the cached one (265 of 300 said so). Now such a call says nothing about the
    candidate; with ``adaptive_in_flight`` the ranker also sheds what the box
    cannot serve in time."""
    rig = await rig_with(adaptive_in_flight=adaptive)
    await full_quality(rig, 42, 50)
    answers: list[sieve_pb2.RankResponse] = []
    shed = 0

    async with grpc.aio.insecure_channel(rig.ranker) as ch:
        stub = sieve_pb2_grpc.RankerServiceStub(ch)

        async def caller(n: int) -> None:
            nonlocal shed
            while len(answers) < 300:
                try:
                    req = sieve_pb2.RankRequest(user_id=1 + n % 600, k=50)
                    answers.append(await stub.Rank(req, timeout=10))
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    shed += 1
                    await asyncio.sleep(0.01)  # the retry with backoff it asks for
                n += 32

        await asyncio.gather(*(caller(i) for i in range(32)))
    blamed = [d for a in answers for d in a.degradations if "candidate breaker open" in d]
    cached = sum("cached_response" in a.rungs for a in answers)
    full = sum(not a.rungs for a in answers)
    assert blamed == []
    assert metric(rig.metrics_url, 'sieve_breaker_state{dependency="candidate"}') == 0.0
    assert cached <= 0.1 * len(answers), (cached, full, shed)
    if adaptive and shed:  # what the box cannot serve in time is shed; the admitted keep theirs
        assert full >= len(answers) / 3, (cached, full, shed)  # 47-54% in three runs here
        # (refusals: 1,094-1,210 in those runs)
    elif adaptive:
        # No refusal: no answer ran out of the ranker's own time. Either the burst
        # needed no shedding (one full-suite run: full quality), or the candidate
        # service itself missed its deadlines on the shared cores (one full-suite run
        # on 12-07: 2 of 331 full, 287 retrieve_failed), which the limiter does
        # not count as this ranker's congestion (a known gap, issue 23's note).
        late = sum(any(d.startswith("retrieve_failed") for d in a.degradations) for a in answers)
        assert full + late >= 0.75 * len(answers), (cached, full, late, shed)
    # without it nothing is shed and nearly every answer takes a time rung (3 of 300
    # were full quality here): the breaker stays closed, but the box is past capacity
