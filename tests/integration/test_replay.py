"""``sieve replay`` on the session's MovieLens set: a frozen ranker (no events) and a
fresh one (events applied by a real worker between a user's steps), side by side
on the same held-out ratings. The fresh ranker never shows an item the user
rated earlier in the replay; the frozen one does, when it had hit it."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.replay import replay, replay_plan
from features.events import EventsConfig, EventWorker, events_repo
from ranker.config import RankerConfig
from sieve import artifacts
from tests.conftest import RELAXED, STATELESS, copy_artifacts


@pytest.fixture
def worker_thread() -> Iterator[list[EventWorker]]:
    """Runs the worker handed to it in a thread until the test ends."""
    held: list[EventWorker] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if held:
                held[0].run_once()
            else:
                stop.wait(0.01)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield held
    stop.set()
    t.join(5)
    for w in held:
        w.close()


async def test_replay_fresh_against_frozen(  # type: ignore[no-untyped-def]
    servers, artifacts_root: Path, redis_server: str, tmp_path: Path, worker_thread
) -> None:
    from ranker.service import create_server

    root = copy_artifacts(artifacts_root, tmp_path / "root")
    events = EventsConfig(enabled=True, redis_url=f"redis://{redis_server}/7",
                          stream=f"rp:{uuid.uuid4().hex}", block_ms=20)  # fmt: skip
    redis.Redis.from_url(events.redis_url).flushdb()
    cfg = RankerConfig(port=0, item_refresh_s=0, candidate_address=servers["candidate"],
                       reliability=RELAXED, rerank=STATELESS, events=events)  # fmt: skip
    server, _ = await create_server(cfg, root)
    worker_thread.append(EventWorker(events, events_repo(root), "replay"))
    try:
        aset = artifacts.load(root)
        plan = replay_plan(aset, users=25, steps=4, seed=0)
        assert plan["userId"].nunique() == 25 and plan["round"].max() == 3
        # the rounds are in time order within each round, users' steps in order
        for _, steps in plan.groupby("userId"):
            assert steps["timestamp"].is_monotonic_increasing
        report = await replay(
            servers["ranker"], f"127.0.0.1:{server.port}", plan, k=50, positive=4.0, gap_s=0.3
        )
    finally:
        await server.stop(0)
    assert report["answers_per_ranker"] == len(plan)
    assert report["answers_showing_an_item_rated_earlier"]["fresh"] == 0
    assert 0 < report["users"] <= 25
    for mode in ("frozen", "fresh"):
        h = report[f"hit_rate_{mode}"]
        assert 0.0 <= h["low"] <= h["mean"] <= h["high"] <= 1.0
    assert worker_thread[0].stats.applied == len(plan)
