"""The offline event log: the stream archived as date-partitioned Parquet by a real
archiver on a real Redis (an archiver that died mid-buffer loses nothing, a repeat
is read once), and its ratings joining MovieLens's before the time split (the
later ones held out, none of them in training)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pandas as pd
import redis

from features.event_log import EventArchiver, merge_ratings, read_event_log, write_parts
from features.events import EventsConfig, parse_events
from protos.sieve.v1 import sieve_pb2
from sieve.data import load_movielens, split

DAY_MS = 86_400_000


def _entries(n: int, t0_ms: int, step_ms: int, kind: int = sieve_pb2.EVENT_TYPE_RATING) -> list:
    req = sieve_pb2.RecordEventsRequest(events=[
        sieve_pb2.Event(event_id=uuid.uuid4().hex, user_id=1 + i % 7, item_id=10 + i, type=kind,  # type: ignore[arg-type]
                        value=4.0 if kind == sieve_pb2.EVENT_TYPE_RATING else 0.0,
                        timestamp_ms=t0_ms + i * step_ms, request_id=f"r{i}")
        for i in range(n)
    ])  # fmt: skip
    return parse_events(req, 60.0)


def test_archive_by_date_and_a_dead_archivers_buffer(redis_server: str, tmp_path: Path) -> None:
    cfg = EventsConfig(enabled=True, redis_url=f"redis://{redis_server}/8",
                       stream=f"log:{uuid.uuid4().hex}", claim_idle_ms=100, block_ms=20,
                       archive_flush_s=0.05)  # fmt: skip
    r = redis.Redis.from_url(cfg.redis_url)
    now = int(time.time() * 1000)
    first = _entries(30, now - 2 * DAY_MS, DAY_MS // 20)  # spans two or three dates
    for e in first:
        r.xadd(cfg.stream, e)  # type: ignore[arg-type]
    a = EventArchiver(cfg, tmp_path / "log", "a")
    while a.run_once():
        pass
    time.sleep(0.06)
    a.run_once()  # the flush interval passed: written, acknowledged
    assert a.archived == 30 and not a.buffer
    dates = sorted(p.name for p in (tmp_path / "log").iterdir())
    days = {pd.Timestamp(int(e["ts"]), unit="ms", tz="UTC").strftime("%Y-%m-%d") for e in first}
    expect = sorted("date=" + d for d in days)
    assert dates == expect and len(dates) >= 2
    # an archiver reads entries and dies before writing them: another claims them
    second = _entries(12, now, 1000, sieve_pb2.EVENT_TYPE_CLICK)
    for e in second:
        r.xadd(cfg.stream, e)  # type: ignore[arg-type]
    got = r.xreadgroup(cfg.archive_group, "dead", {cfg.stream: ">"}, count=100)
    assert len(got[0][1]) == 12
    time.sleep(0.15)
    b = EventArchiver(cfg, tmp_path / "log", "b")
    b.run_once()
    b.flush()
    assert b.archived == 12
    assert r.xpending(cfg.stream, cfg.archive_group)["pending"] == 0
    # a repeat (a buffer written twice after a claim) is read once
    log = read_event_log(tmp_path / "log")
    write_parts(tmp_path / "log", log.iloc[:5].assign(stream_id="0-1"))
    again = read_event_log(tmp_path / "log")
    assert len(again) == len(log) == 42
    assert set(again["event_id"]) == {e["id"] for e in first + second}
    assert again["timestamp_ms"].is_monotonic_increasing
    row = again[again["event_id"] == first[3]["id"]].iloc[0]
    assert (row.user_id, row.item_id, row.type, row.request_id) == (4, 13, "rating", "r3")
    b.close()
    a.close()


def test_event_ratings_join_before_the_time_split(movielens_dir: Path) -> None:
    ml = load_movielens(movielens_dir)
    last = int(ml.ratings["timestamp"].max())
    user = int(ml.ratings["userId"].iloc[0])
    seen = set(ml.ratings.loc[ml.ratings["userId"] == user, "movieId"])
    fresh_item = int(next(i for i in ml.movies["movieId"] if i not in seen))
    rerated = int(ml.ratings.loc[ml.ratings["userId"] == user, "movieId"].iloc[0])
    events = pd.DataFrame({
        "event_id": ["e1", "e2", "e3", "e4"],
        "user_id": [user, user, user, user],
        "item_id": [fresh_item, rerated, 99_999_999, fresh_item],
        "type": ["rating", "rating", "rating", "click"],
        "value": [5.0, 1.0, 3.0, 0.0],
        "timestamp_ms": [(last + 100) * 1000, (last + 200) * 1000, (last + 300) * 1000,
                         (last + 400) * 1000],
    })  # fmt: skip
    merged, stats = merge_ratings(ml.ratings, events, ml.movies["movieId"])
    assert stats == {"event_ratings": 3, "unknown_items": 1, "replaced": 1}
    assert len(merged) == len(ml.ratings) + 1
    mine = merged[merged["userId"] == user].set_index("movieId")
    assert mine.loc[fresh_item, "rating"] == 5.0 and mine.loc[rerated, "rating"] == 1.0
    # everything after T held out: the events are the latest ratings, so none trains
    train, holdout = split(merged, 0.2, "global")
    assert train["timestamp"].max() <= holdout["timestamp"].min()
    ev = holdout[(holdout["userId"] == user) & holdout["movieId"].isin([fresh_item, rerated])]
    assert len(ev) == 2
    assert not ((train["userId"] == user) & (train["movieId"] == fresh_item)).any()
