"""Stage deadlines, the circuit breaker, the TTL cache and the cached-answer codec."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.config import BreakerConfig, StageBudgetMs
from ranker.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    Deadlines,
    InFlightLimit,
    TtlCache,
)
from ranker.response_cache import CachedAnswer, MemoryResponseCache, decode, encode


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deadlines_are_cumulative_budgets_plus_headroom() -> None:
    d = Deadlines(StageBudgetMs(), start=10.0)
    # 3, 10, 6, 10, 3 ms lines and 15 ms of shared headroom
    ends = {s: round((d.end(s) - 10.0) * 1e3, 6) for s in ("user_features", "retrieve",
            "item_features", "score", "rerank")}  # fmt: skip
    assert ends == {"user_features": 18.0, "retrieve": 28.0, "item_features": 34.0,
                    "score": 44.0, "rerank": 47.0}  # fmt: skip
    assert d.left("retrieve", now=10.020) == pytest.approx(0.008)
    assert d.left("user_features", now=10.030) < 0


def test_a_short_caller_deadline_leaves_the_later_stages_their_budgets() -> None:
    d = Deadlines(StageBudgetMs(), start=0.0, caller_left_s=0.030)
    # retrieve must end 6 + 10 + 3 + 3 (hops) = 22 ms before the caller's 30 ms
    assert d.end("retrieve") == pytest.approx(0.008)
    assert d.end("rerank") == pytest.approx(0.027)
    # a long caller deadline does not stretch the budgets
    assert Deadlines(StageBudgetMs(), 0.0, caller_left_s=10.0).end("rerank") == pytest.approx(0.047)


def test_breaker_opens_after_consecutive_failures_then_probes() -> None:
    clock, states = FakeClock(), []
    b = Breaker("candidate", BreakerConfig(failures=3, open_s=1.0), states.append, clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    b.success()  # resets the count
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == OPEN and not b.allow()
    clock.now += 0.5
    assert not b.allow()
    clock.now += 0.6
    assert b.allow() and b.state == HALF_OPEN  # the probe
    assert not b.allow()  # one probe at a time
    b.failure()
    assert b.state == OPEN and not b.allow()
    clock.now += 1.1
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()
    assert states == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_a_lost_probe_is_replaced_after_open_s() -> None:
    clock = FakeClock()
    b = Breaker("x", BreakerConfig(failures=1, open_s=1.0), clock=clock)
    b.failure()
    clock.now += 1.0
    assert b.allow()  # probe goes out and never reports
    clock.now += 1.0
    assert b.allow() and b.state == HALF_OPEN


def test_ttl_cache_expires_and_evicts_the_oldest() -> None:
    clock = FakeClock()
    c: TtlCache[int, str] = TtlCache(2, ttl_s=10.0, clock=clock)
    c.put(1, "a")
    c.put(2, "b")
    c.put(1, "a2")  # refreshed: now the newest
    c.put(3, "c")
    assert c.get(2) is None and c.get(1) == "a2" and c.get(3) == "c"
    clock.now += 10.5
    assert c.get(1) is None and len(c) == 1
    off: TtlCache[int, str] = TtlCache(0, 10.0)
    off.put(1, "a")
    assert off.get(1) is None


def _answer(n: int) -> CachedAnswer:
    rng = np.random.default_rng(n)
    return CachedAnswer(
        ids=rng.integers(1, 2**62, n),
        final=rng.random(n, np.float32),
        candidate=rng.random(n, np.float32),
        model=rng.random(n, np.float32),
        ranks=rng.integers(-1, 1000, n).astype(np.int32),
    )


@pytest.mark.parametrize("n", [0, 1, 50])
def test_cached_answer_round_trips(n: int) -> None:
    a = _answer(n)
    b = decode(encode(a))
    for name in ("ids", "final", "candidate", "model", "ranks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(b, name).dtype == getattr(a, name).dtype


def test_a_truncated_cached_answer_is_refused() -> None:
    raw = encode(_answer(5))
    with pytest.raises(ValueError, match="5 items"):
        decode(raw[:-1])


async def test_memory_response_cache_keys_by_version() -> None:
    cache = MemoryResponseCache(ttl_s=60.0, max_users=10)
    await cache.put("v1", 7, _answer(3))
    assert await cache.get("v2", 7) is None
    got = await cache.get("v1", 7)
    assert got is not None and len(got.ids) == 3


def test_an_inconclusive_call_neither_opens_nor_closes_the_breaker() -> None:
    now = [0.0]
    b = Breaker("candidate", BreakerConfig(failures=2, open_s=1.0), clock=lambda: now[0])
    b.failure()
    for _ in range(10):  # given too little time: says nothing about the dependency
        b.inconclusive()
    assert b.state == CLOSED
    b.failure()
    assert b.state == OPEN
    now[0] = 1.5
    assert b.allow() and b.state == HALF_OPEN  # the probe goes out ...
    b.inconclusive()  # ... and runs out of the caller's time
    assert b.state == HALF_OPEN and b.allow()  # so the next call probes at once
    b.success()
    assert b.state == CLOSED


def test_in_flight_limit_cuts_on_late_answers_once_a_window_and_grows_back() -> None:
    now = [0.0]
    limit = InFlightLimit(4, 32, backoff=0.8, window_s=0.05, clock=lambda: now[0])
    assert limit.limit == 32
    for n in range(200):  # a late tail, one answer in ten: a load the box serves
        now[0] += 0.1
        limit.answered(out_of_time=n % 10 == 0, in_flight=12)
    assert limit.limit == 32
    for _ in range(20):  # then most answers late: congestion ...
        limit.answered(out_of_time=True, in_flight=4)
    assert limit.late_share > 0.8 and limit.congested
    assert limit.limit == 32  # ... but with next to nothing in flight: not the queue
    now[0] += 0.1
    limit.answered(out_of_time=True, in_flight=20)
    assert limit.limit == 16  # 0.8 x the calls in flight then
    limit.answered(out_of_time=True, in_flight=16)  # the same burst: one signal
    assert limit.limit == 16
    for _ in range(50):
        now[0] += 0.1
        limit.answered(out_of_time=True, in_flight=30)
    assert limit.limit == 4  # never under the floor
    timely = 0
    while limit.limit < 8:
        limit.answered(out_of_time=False, in_flight=3)
        timely += 1
    assert 16 <= timely <= 30  # about one call more per `limit` timely answers
    for _ in range(10_000):
        limit.answered(out_of_time=False, in_flight=3)
    assert limit.limit == 32  # never over max_in_flight
