"""The shown-history stores: in process, and on a real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from ranker.history import MemoryHistory, RedisHistory, ShownHistory


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture(params=["memory", "redis"])
async def make(request, redis_server: str, clock: Clock) -> AsyncIterator:  # type: ignore[no-untyped-def]
    opened: list[ShownHistory] = []

    def _make(ttl_s: float = 60.0, max_items: int = 5) -> ShownHistory:
        h: ShownHistory = (
            MemoryHistory(ttl_s, max_items, max_users=3, clock=clock)
            if request.param == "memory"
            else RedisHistory(
                f"redis://{redis_server}/0",
                ttl_s,
                max_items,
                f"test:{uuid.uuid4().hex}",
                clock=clock,
            )
        )
        opened.append(h)
        return h

    yield _make
    for h in opened:
        await h.close()


async def test_records_and_reads_back(make) -> None:  # type: ignore[no-untyped-def]
    h = make()
    assert len(await h.recent(1)) == 0
    await h.record(1, np.array([10, 11, 12]))
    await h.record(2, np.array([20]))
    await h.record(1, np.array([12, 13]))
    assert sorted((await h.recent(1)).tolist()) == [10, 11, 12, 13]
    assert (await h.recent(2)).tolist() == [20]


async def test_keeps_the_newest_max_items(make, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    h = make(max_items=5)
    await h.record(1, np.array([1, 2, 3]))
    clock.now += 0.01
    await h.record(1, np.array([4, 5, 6, 7]))
    assert sorted((await h.recent(1)).tolist()) == [3, 4, 5, 6, 7]


async def test_forgets_after_the_ttl(make, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    h = make(ttl_s=0.3)
    await h.record(1, np.array([1, 2]))
    clock.now += 0.29
    assert len(await h.recent(1)) == 2
    clock.now += 0.02
    assert len(await h.recent(1)) == 0


async def test_memory_store_bounds_users() -> None:
    h = MemoryHistory(60.0, 5, max_users=2)
    for user in (1, 2, 3):
        await h.record(user, np.array([user]))
    assert len(await h.recent(1)) == 0 and (await h.recent(3)).tolist() == [3]


async def test_recording_nothing_is_a_no_op(make) -> None:  # type: ignore[no-untyped-def]
    h = make()
    await h.record(1, np.empty(0, np.int64))
    assert len(await h.recent(1)) == 0
