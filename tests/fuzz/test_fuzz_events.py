"""Property-based fuzzing of RecordEvents over a real ranker and a real Redis stream.

Each example is a batch of events with every field drawn from valid and invalid
values. An independent oracle (``bad_field``, written from the proto's comments,
not from the parser) says whether the batch is valid; then:

* the status is never INTERNAL or UNKNOWN;
* a batch with a bad event is INVALID_ARGUMENT naming that event's index, and the
  stream does not grow (all or none);
* a valid batch is acknowledged whole, and the stream grew by exactly its size.

Batches go one at a time (the stream's length is the oracle of all-or-none).
``SIEVE_FUZZ_EVENTS`` sets the number of batches (default 300).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from features.events import EventsConfig
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from tests.conftest import RELAXED, STATELESS, copy_artifacts
from tests.fuzz.conftest import FUZZ

BATCHES = int(os.environ.get("SIEVE_FUZZ_EVENTS", "300"))
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
INT64 = st.integers(-(2**63), 2**63 - 1)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def events_ranker(  # type: ignore[no-untyped-def]
    servers, artifacts_root: Path, redis_server: str, tmp_path_factory
) -> AsyncIterator[dict[str, Any]]:
    from ranker.service import create_server

    root = copy_artifacts(artifacts_root, tmp_path_factory.mktemp("fuzz_events"))
    events = EventsConfig(
        enabled=True, redis_url=f"redis://{redis_server}/6", stream=f"fz:{uuid.uuid4().hex}"
    )
    cfg = RankerConfig(port=0, item_refresh_s=0, candidate_address=servers["candidate"],
                       reliability=RELAXED, rerank=STATELESS, events=events)  # fmt: skip
    server, _ = await create_server(cfg, root)
    r = redis.Redis.from_url(events.redis_url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield {"stub": sieve_pb2_grpc.RankerServiceStub(ch), "redis": r, "stream": events.stream}
    r.close()
    await server.stop(0)


def now_ms() -> int:
    return int(time.time() * 1000)


# When an event happened: relative to the time the batch is sent (so the drawn
# choices never depend on the clock), or absolute.
STAMPS = st.one_of(
    st.tuples(st.just("ago"), st.integers(0, 10**12)),
    st.tuples(st.just("ahead"), st.sampled_from([3_600_000, 10**9])),
    st.tuples(st.just("at"), st.integers(-5, 5)),
    st.tuples(st.just("at"), INT64),
)


def stamp(spec: tuple[str, int]) -> int:
    kind, n = spec
    now = now_ms()
    return now - n if kind == "ago" else now + n if kind == "ahead" else n


@st.composite
def events(draw: st.DrawFn) -> sieve_pb2.Event:
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, -1]))
    return sieve_pb2.Event(
        event_id=draw(st.one_of(
            st.just(""), st.text(min_size=1, max_size=70),
            st.builds(lambda: uuid.uuid4().hex), st.text("ab-_:.", min_size=1, max_size=64),
        )),
        user_id=draw(st.one_of(st.integers(0, 10**6), INT64)),
        item_id=draw(st.one_of(st.integers(0, 10**6), INT64)),
        type=kind,  # type: ignore[arg-type]
        value=draw(st.one_of(st.just(0.0), st.sampled_from([0.5, 3.0, 5.0]),
                             st.floats(allow_nan=True, allow_infinity=True, width=32))),
        request_id=draw(st.one_of(st.just(""), st.text(max_size=80))),
        artifact_version=draw(st.one_of(st.just(""), st.text(max_size=80))),
        timestamp_ms=stamp(draw(STAMPS)),
    )  # fmt: skip


def _ok_text(s: str, n: int) -> bool:
    return len(s) <= n and all(32 <= ord(c) < 127 for c in s)


def bad_field(e: sieve_pb2.Event) -> str:
    """What the proto's comments say is wrong with ``e`` ("" for nothing)."""
    if not (1 <= len(e.event_id) <= 64 and all(33 <= ord(c) < 127 for c in e.event_id)):
        return "event_id"
    if e.type not in (1, 2, 3, 4):
        return "type"
    if e.user_id < 0 or e.item_id < 0:
        return "user_id"
    if e.type == 3 and not (0.5 <= e.value <= 5.0):
        return "value"
    if e.type != 3 and e.value != 0:
        return "value"
    if not (0 < e.timestamp_ms <= now_ms() + 60_000):  # a minute ahead at most
        return "timestamp_ms"
    if not _ok_text(e.request_id, 64) or not _ok_text(e.artifact_version, 64):
        return "request_id"
    return ""


@settings(FUZZ, max_examples=BATCHES)
@given(batch=st.lists(events(), min_size=0, max_size=12))
async def test_fuzz_record_events(events_ranker: dict[str, Any], batch: list[Any]) -> None:
    stub, r, stream = events_ranker["stub"], events_ranker["redis"], events_ranker["stream"]
    verdicts = [bad_field(e) for e in batch]
    before = r.xlen(stream)
    try:
        resp = await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=batch), timeout=10)
        status, details = grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as e:
        status, details, resp = e.code(), e.details() or "", None
    assert status not in NEVER, details
    first_bad = next((i for i, v in enumerate(verdicts) if v), None)
    if not batch or first_bad is not None:
        assert status == grpc.StatusCode.INVALID_ARGUMENT, (status, details, verdicts)
        if batch:
            assert f"events[{first_bad}]" in details, (details, verdicts)
        assert r.xlen(stream) == before
    else:
        assert status == grpc.StatusCode.OK, (status, details)
        assert resp is not None and resp.accepted == len(batch)
        assert r.xlen(stream) == before + len(batch)
