"""The feedback loop against real servers, a real Redis stream and Feast as the oracle:
an acknowledged rating is excluded by the next Rank; what the worker wrote is what
Feast's SDK reads (and our reader equals it); a redelivered event applies once; a
malformed entry goes to the dead letters; a worker that died before acknowledging
leaves nothing behind; a bad batch is refused whole."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import redis

from features.events import (
    EVENT_VIEWS,
    ITEM_EVENTS_VIEW,
    USER_EVENTS_VIEW,
    EventsConfig,
    EventWorker,
    events_repo,
)
from features.reader import open_reader
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from tests.conftest import RELAXED, STATELESS, copy_artifacts

RATING, CLICK = sieve_pb2.EVENT_TYPE_RATING, sieve_pb2.EVENT_TYPE_CLICK


def event(user: int, item: int, kind: int = RATING, value: float = 5.0, **kw: Any) -> Any:
    return sieve_pb2.Event(
        event_id=kw.pop("event_id", uuid.uuid4().hex),
        user_id=user,
        item_id=item,
        type=kind,
        value=value if kind == RATING else 0.0,
        timestamp_ms=kw.pop("timestamp_ms", int(time.time() * 1000)),
        **kw,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def loop_ranker(  # type: ignore[no-untyped-def]
    servers, artifacts_root: Path, redis_server: str, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    """A ranker taking events (on a private copy of the set), its stream in a fresh
    Redis database, and a worker (driven by the test, one batch at a time)."""
    from ranker.service import create_server

    root = copy_artifacts(artifacts_root, tmp_path / "root")
    db = 5
    r = redis.Redis.from_url(f"redis://{redis_server}/{db}")
    r.flushdb()
    events = EventsConfig(
        enabled=True,
        redis_url=f"redis://{redis_server}/{db}",
        stream=f"ev:{uuid.uuid4().hex}",
        claim_idle_ms=100,
    )
    cfg = RankerConfig(
        port=0,
        item_refresh_s=0,
        candidate_address=servers["candidate"],
        reliability=RELAXED,
        rerank=STATELESS,
        events=events,
    )
    server, pipeline = await create_server(cfg, root)
    worker = EventWorker(events, events_repo(root), "w1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield {
            "stub": sieve_pb2_grpc.RankerServiceStub(ch),
            "worker": worker,
            "redis": r,
            "config": events,
            "root": root,
        }
    worker.close()
    await server.stop(0)


async def drain(worker: EventWorker) -> None:
    while await asyncio.to_thread(worker.run_once):
        pass


async def test_a_rated_item_is_gone_from_the_next_rank(loop_ranker) -> None:  # type: ignore[no-untyped-def]
    stub, worker = loop_ranker["stub"], loop_ranker["worker"]
    before = await stub.Rank(sieve_pb2.RankRequest(user_id=42, k=20), timeout=30)
    assert len(before.request_id) == 16 and not before.rungs
    top = before.items[0].item_id
    shown = event(42, top, request_id=before.request_id,
                  artifact_version=before.artifact_version)  # fmt: skip
    ack = await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=[shown]), timeout=10)
    assert ack.accepted == 1
    # acknowledged means in the stream, before any worker ran
    (entry,) = loop_ranker["redis"].xrange(loop_ranker["config"].stream)
    assert entry[1][b"id"] == shown.event_id.encode()
    assert entry[1][b"request"] == before.request_id.encode()
    await drain(worker)
    after = await stub.Rank(sieve_pb2.RankRequest(user_id=42, k=20), timeout=30)
    assert top not in [i.item_id for i in after.items]
    assert not after.rungs and not any("events" in d for d in after.degradations)
    # the new history reached the user tower: the answer is not the old one minus one
    assert [i.item_id for i in after.items] != [i.item_id for i in before.items[1:]][:20]
    assert worker.stats.applied == 1 and worker.stats.duplicates == 0


async def test_feast_reads_what_the_worker_wrote(loop_ranker) -> None:  # type: ignore[no-untyped-def]
    from feast import FeatureStore

    stub, worker = loop_ranker["stub"], loop_ranker["worker"]
    batch = [event(7, 1), event(7, 2, value=3.0), event(7, 1, CLICK), event(8, 2, CLICK)]
    # an event sent twice (a retried batch) is applied once
    await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=batch), timeout=10)
    await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=batch[:1]), timeout=10)
    await drain(worker)
    assert worker.stats.applied == 4 and worker.stats.duplicates == 1
    repo = events_repo(loop_ranker["root"])
    store = FeatureStore(repo_path=str(repo))
    users = store.get_online_features(
        [f"{USER_EVENTS_VIEW.name}:{f.name}" for f in USER_EVENTS_VIEW.features],
        [{"user_id": 7}, {"user_id": 8}],
    ).to_dict()
    assert sorted(users["event_seen_item_ids"][0]) == [1, 2]
    assert users["event_recent_item_ids"][0] == [1, 2]  # in time order, newest last
    assert not users["event_seen_item_ids"][1]  # a click is not a rating
    items = store.get_online_features(
        [f"{ITEM_EVENTS_VIEW.name}:{f.name}" for f in ITEM_EVENTS_VIEW.features],
        [{"item_id": 1}, {"item_id": 2}],
    ).to_dict()
    assert items["ratings_window"] == [1, 1] and items["clicks_window"] == [1, 1]
    # our reader (what the ranker reads) equals Feast's SDK
    reader = open_reader(repo)
    await reader.start()
    try:
        reader.prepare(EVENT_VIEWS)
        ours = await reader.read(USER_EVENTS_VIEW, np.array([7, 8], np.int64))
        for f in USER_EVENTS_VIEW.features:
            assert [list(x) for x in ours.lists(f.name)] == [list(x or []) for x in users[f.name]]
        theirs_items = await reader.read(ITEM_EVENTS_VIEW, np.array([1, 2], np.int64))
        for f in ITEM_EVENTS_VIEW.features:
            assert theirs_items.array(f.name).tolist() == items[f.name]
    finally:
        await reader.close()


async def test_a_malformed_entry_goes_to_the_dead_letters(loop_ranker) -> None:  # type: ignore[no-untyped-def]
    stub, worker, r = loop_ranker["stub"], loop_ranker["worker"], loop_ranker["redis"]
    cfg = loop_ranker["config"]
    # another producer's entries, behind the RPC's validation
    r.xadd(cfg.stream, {"id": "p1", "user": "9", "item": "x", "type": "rating",
                        "value": "5.0", "ts": "1"})  # fmt: skip
    r.xadd(cfg.stream, {"id": "p2", "type": "nonsense"})
    good = event(9, 3)
    await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=[good]), timeout=10)
    await drain(worker)
    dead = r.xrange(cfg.dead_letter)
    assert [d[1][b"id"] for d in dead] == [b"p1", b"p2"]
    assert dead[0][1][b"reason"].startswith(b"not a number")
    assert b"missing fields" in dead[1][1][b"reason"]
    assert worker.stats.applied == 1 and worker.stats.dead == 2
    assert r.xpending(cfg.stream, cfg.group)["pending"] == 0  # nothing left blocking


async def test_entries_of_a_dead_worker_are_claimed(loop_ranker) -> None:  # type: ignore[no-untyped-def]
    stub, worker, r = loop_ranker["stub"], loop_ranker["worker"], loop_ranker["redis"]
    cfg = loop_ranker["config"]
    sent = [event(11, 4), event(11, 5)]
    await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=sent), timeout=10)
    # a worker reads them and dies before it applies or acknowledges them
    got = r.xreadgroup(cfg.group, "dead-worker", {cfg.stream: ">"}, count=10)
    assert len(got[0][1]) == 2
    assert r.xpending(cfg.stream, cfg.group)["pending"] == 2
    await asyncio.sleep(cfg.claim_idle_ms / 1000 + 0.1)
    await drain(worker)
    assert worker.stats.claimed == 2 and worker.stats.applied == 2
    assert r.xpending(cfg.stream, cfg.group)["pending"] == 0
    after = await stub.Rank(sieve_pb2.RankRequest(user_id=11, k=50), timeout=30)
    assert not {4, 5} & {i.item_id for i in after.items}


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([], "1..1000 events"),
        ([event(1, 1)] * 1001, "1..1000 events"),
        ([event(1, 1, event_id="")], "event_id must be"),
        ([event(1, 1, event_id="a b")], "event_id must be"),
        ([event(1, 1, value=7.0)], "0.5..5"),
        (
            [
                event(1, 1, CLICK),
                sieve_pb2.Event(
                    event_id="c", user_id=1, item_id=1, type=CLICK, value=1.0, timestamp_ms=1
                ),
            ],
            "events\\[1\\].*value is for ratings",
        ),  # fmt: skip
        ([event(1, 1, kind=0)], "type must be"),
        ([event(-1, 1)], ">= 0"),
        ([event(1, 1, timestamp_ms=int(time.time() * 1000) + 3_600_000)], "timestamp_ms"),
        ([event(1, 1, request_id="x" * 65)], "request_id"),
    ],
)
async def test_a_bad_batch_is_refused_whole(loop_ranker, events, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await loop_ranker["stub"].RecordEvents(
            sieve_pb2.RecordEventsRequest(events=events), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert __import__("re").search(message, e.value.details()), e.value.details()
    assert loop_ranker["redis"].xlen(loop_ranker["config"].stream) == 0


async def test_a_ranker_without_events_says_how_to_turn_them_on(servers) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(servers["ranker"]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await sieve_pb2_grpc.RankerServiceStub(ch).RecordEvents(
                sieve_pb2.RecordEventsRequest(events=[event(1, 1)]), timeout=10
            )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "[ranker.events] enabled" in e.value.details()


async def test_the_stream_is_trimmed_of_what_every_group_acknowledged(loop_ranker) -> None:  # type: ignore[no-untyped-def]
    from features.events import trim_stream

    stub, worker, r = loop_ranker["stub"], loop_ranker["worker"], loop_ranker["redis"]
    cfg = loop_ranker["config"]
    first = [event(21, 1), event(21, 2), event(21, 3)]
    await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=first), timeout=10)
    await drain(worker)
    # a second group (an archiver) that has read only the first entry, unacknowledged
    r.xgroup_create(cfg.stream, "slow", id="0")
    held = r.xreadgroup("slow", "s1", {cfg.stream: ">"}, count=1)[0][1][0][0]
    assert trim_stream(r, cfg.stream) == 0  # the slow group still needs all three
    r.xack(cfg.stream, "slow", held)
    r.xreadgroup("slow", "s1", {cfg.stream: ">"}, count=1)  # the second, pending
    assert trim_stream(r, cfg.stream) == 1  # the first is everyone's past
    r.xgroup_destroy(cfg.stream, "slow")
    assert trim_stream(r, cfg.stream) == 2 and r.xlen(cfg.stream) == 0
    # new events after a trim are read and applied as before
    await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=[event(21, 4)]), timeout=10)
    await drain(worker)
    assert worker.stats.applied == 4


async def test_a_stream_redis_that_is_down_leaves_rank_serving(  # type: ignore[no-untyped-def]
    servers, artifacts_root: Path, tmp_path: Path
) -> None:
    from ranker.service import create_server
    from sieve.local_redis import free_port

    root = copy_artifacts(artifacts_root, tmp_path / "root")
    events = EventsConfig(enabled=True, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    cfg = RankerConfig(port=0, item_refresh_s=0, candidate_address=servers["candidate"],
                       reliability=RELAXED, rerank=STATELESS, events=events)  # fmt: skip
    server, _ = await create_server(cfg, root)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = sieve_pb2_grpc.RankerServiceStub(ch)
            answer = await stub.Rank(sieve_pb2.RankRequest(user_id=42), timeout=30)
            assert answer.items and not answer.rungs
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.RecordEvents(
                    sieve_pb2.RecordEventsRequest(events=[event(42, 1)]), timeout=10
                )
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not acknowledged: retry it" in e.value.details()
    finally:
        await server.stop(0)
