"""The feedback loop's online half: events into a Redis Stream, applied to features.

``RecordEvents`` (the ranker's port) validates a batch and appends it to the stream
``[ranker.events] stream`` in one MULTI/EXEC: acknowledged means every event of
the batch is in Redis (all or none). How durable that is depends on Redis's own
persistence: with ``appendonly yes`` an acknowledged event survives a Redis
SIGKILL and restart (Redis writes the AOF before it replies; ``appendfsync
everysec``, the default, can lose the last second on a machine crash, ``always``
nothing, at an fsync per write). ``EventStream.start`` reads the setting and
warns when an acknowledged event would not survive a restart.

``sieve events`` workers (``EventWorker``, any number: one consumer group) read
batches, and for each:

1. send a malformed entry to the dead-letter stream with the reason (it never
   blocks the rest);
2. apply the others in one Lua script: per event id a ``SET NX`` marker (kept
   ``dedupe_ttl_s``), so a redelivered event changes nothing twice; a rating adds
   the item to the user's seen set and recent list; every event counts into the
   item's per-type counters of its time bucket;
3. write each touched user's and item's current state to the online store in
   Feast's layout, through Feast's own ``push`` (the ``user_events`` and
   ``item_events`` views of the events repo, ``ROOT/events/feature_repo``),
   stamped with Redis's clock at step 2, so a slower worker's older snapshot
   never overwrites a newer one (Feast keeps the newer timestamp);
4. acknowledge (XACK).

A worker killed anywhere before 4 leaves its entries pending: any worker claims
entries idle for ``claim_idle_ms`` (XAUTOCLAIM) and runs them again; step 2's
markers make that idempotent and step 3 rewrites the same state. The ranker reads
both views beside the user's features and merges them (``with_events``): the
rated item is excluded and the user tower sees the new history at the next Rank.

Single Redis node (the Lua script touches keys of several users); a Redis
Cluster deployment needs the script split by hash slot (not built).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from features.definitions import FeatureSpec, ViewSpec, feast_view
from features.reader import FeatureFrame
from protos.sieve.v1 import sieve_pb2
from sieve.config import Frozen
from sieve.errors import ArtifactError, InvalidRequest

log = logging.getLogger(__name__)

TYPES = {
    sieve_pb2.EVENT_TYPE_IMPRESSION: "impression",
    sieve_pb2.EVENT_TYPE_CLICK: "click",
    sieve_pb2.EVENT_TYPE_RATING: "rating",
    sieve_pb2.EVENT_TYPE_SKIP: "skip",
}
MAX_BATCH = 1000
_ID = re.compile(r"[\x21-\x7e]{1,64}")


class EventsConfig(Frozen):
    """``[ranker.events]``: the feedback loop (``features/events.py``); off by default."""

    enabled: bool = False
    redis_url: str = "redis://127.0.0.1:6379/0"
    """The Redis holding the stream, the dead letters and the workers' state (one
    node; ``appendonly yes`` for acknowledged events to survive a restart)."""
    stream: str = "sieve:events"
    dead_letter: str = "sieve:events:dead"
    group: str = "sieve-events"
    prefix: str = "sieve:ev:"
    """Keys of the workers' state: ``done:<event id>``, ``seen:{user}``,
    ``recent:{user}``, ``item:{item}:<bucket>``, and ``stats`` (events applied and
    duplicates skipped, by every worker since the start)."""
    feast_project: str = Field("sieve_events", pattern=r"^[a-z][a-z0-9_]*$")
    """The Feast project of the events views (one for every artifact set)."""
    batch: int = Field(500, ge=1, le=10_000)
    """Entries a worker reads at a time."""
    block_ms: int = Field(200, ge=1, le=60_000)
    claim_idle_ms: int = Field(5_000, ge=100)
    """A pending entry idle this long (its worker died) is claimed by another."""
    dedupe_ttl_s: int = Field(7 * 86_400, ge=60)
    """How long an applied event id is remembered (a redelivery within it is a no-op)."""
    recent: int = Field(50, ge=1, le=500)
    """Rated items kept per user, newest last (the user tower's input)."""
    max_seen: int = Field(10_000, ge=1)
    window_s: int = Field(3600, ge=60)
    """Item counters cover the current and the previous window of this length."""
    max_future_s: float = Field(60.0, ge=0.0)
    """An event stamped further ahead of the ranker's clock is refused."""
    read_wait_ms: float = Field(10.0, ge=0.0)
    """A Rank waits for the user's events row until its user-features deadline and at
    least this long; past it the Rank goes on without it (``events_unavailable``)."""
    trim_s: float = Field(30.0, ge=0.0)
    """How often a worker trims the stream of entries every consumer group has read
    and acknowledged (``trim_stream``); 0: never (the stream grows without end)."""
    archive_group: str = "sieve-archive"
    """The consumer group of ``sieve events --archive`` (``features/event_log.py``)."""
    archive_rows: int = Field(10_000, ge=1)
    archive_flush_s: float = Field(2.0, gt=0.0)
    """An archiver writes its buffer this often (keep it under ``claim_idle_ms``)."""


USER_EVENTS_VIEW = ViewSpec(
    name="user_events",
    entity="user",
    join_key="user_id",
    features=(
        FeatureSpec("event_seen_item_ids", "int64_list"),
        FeatureSpec("event_recent_item_ids", "int64_list"),
    ),
)
COUNTED = ("impression", "click", "rating", "skip")
ITEM_EVENTS_VIEW = ViewSpec(
    name="item_events",
    entity="item",
    join_key="item_id",
    features=tuple(FeatureSpec(f"{t}s_window", "int64") for t in COUNTED),
)
EVENT_VIEWS = (USER_EVENTS_VIEW, ITEM_EVENTS_VIEW)


# ------------------------------------------------------------------ the RPC --


def parse_events(
    request: sieve_pb2.RecordEventsRequest, max_future_s: float
) -> list[dict[str, str]]:
    """The batch as stream entries (field -> text).

    Raises:
        InvalidRequest: naming the first bad event and what is wrong with it.
    """
    n = len(request.events)
    if not 1 <= n <= MAX_BATCH:
        raise InvalidRequest(f"events: send 1..{MAX_BATCH} events per call, got {n}")
    limit_ms = (time.time() + max_future_s) * 1000
    out = []
    for i, e in enumerate(request.events):
        where = f"events[{i}] (event_id {e.event_id[:64]!r})"
        if not _ID.fullmatch(e.event_id):
            raise InvalidRequest(f"{where}: event_id must be 1..64 printable ASCII characters")
        kind = TYPES.get(e.type)
        if kind is None:
            raise InvalidRequest(f"{where}: type must be one of IMPRESSION, CLICK, RATING, SKIP")
        if e.user_id < 0 or e.item_id < 0:
            raise InvalidRequest(f"{where}: user_id and item_id must be >= 0")
        if kind == "rating" and not (0.5 <= e.value <= 5.0):
            raise InvalidRequest(f"{where}: a rating's value must be in 0.5..5, got {e.value}")
        if kind != "rating" and e.value != 0:
            raise InvalidRequest(f"{where}: value is for ratings only; send 0 for a {kind}")
        if not 0 < e.timestamp_ms <= limit_ms:
            raise InvalidRequest(
                f"{where}: timestamp_ms {e.timestamp_ms} is not a time up to "
                f"{max_future_s:g} s from now (milliseconds since the Unix epoch)"
            )
        for name, text in (("request_id", e.request_id), ("artifact_version", e.artifact_version)):
            if len(text) > 64 or not text.isascii() or not text.isprintable():
                raise InvalidRequest(f"{where}: {name} must be up to 64 printable ASCII characters")
        out.append({
            "id": e.event_id, "user": str(e.user_id), "item": str(e.item_id), "type": kind,
            "value": repr(float(e.value)), "ts": str(e.timestamp_ms),
            "request": e.request_id, "version": e.artifact_version,
        })  # fmt: skip
    return out


class EventStream:
    """The ranker's side: appends validated batches to the stream."""

    def __init__(self, config: EventsConfig) -> None:
        import redis.asyncio as aredis

        self.config = config
        self.redis = aredis.Redis.from_url(config.redis_url, socket_timeout=2.0)

    async def start(self) -> None:
        """Say what the stream's Redis persistence keeps. A Redis that does not
        answer is logged, not fatal: Rank serves, and RecordEvents answers
        UNAVAILABLE until the Redis is back (the client reconnects)."""
        from redis.exceptions import RedisError

        try:
            conf = await self.redis.config_get("append*")
        except RedisError as e:
            log.warning("events: %s does not answer (%s); RecordEvents answers UNAVAILABLE "
                        "until it does", self.config.redis_url, e)  # fmt: skip
            return
        aof = conf.get(b"appendonly", conf.get("appendonly"))
        if aof in (b"no", "no"):
            log.warning(
                "events: %s runs without appendonly: an acknowledged event is lost if "
                "that Redis restarts (set appendonly yes)", self.config.redis_url
            )  # fmt: skip

    async def append(self, entries: list[dict[str, str]]) -> None:
        """All of ``entries`` into the stream, or none (MULTI/EXEC)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for entry in entries:
                pipe.xadd(self.config.stream, entry)  # type: ignore[arg-type]
            await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()


# -------------------------------------------------------- the events repo --

REPO_MODULE = '''"""Generated by sieve: the Feast repo of the events views (one for every set)."""
from pathlib import Path

from features.events import event_definitions

objects = event_definitions(Path(__file__).parent / "data")
'''


def event_definitions(data_dir: Path) -> list[object]:
    """Feast objects: the two views, each fed by a push source over a parquet log."""
    from feast import FileSource, PushSource

    objects: list[object] = []
    for spec in EVENT_VIEWS:
        push = PushSource(
            name=f"{spec.name}_push",
            batch_source=FileSource(
                name=f"{spec.name}_log",
                path=str(Path(data_dir).resolve() / f"{spec.name}.parquet"),
                timestamp_field="event_timestamp",
            ),
        )
        entity, view = feast_view(spec, push)
        objects += [entity, push, view]
    return objects


def events_repo(root: Path) -> Path:
    return Path(root) / "events" / "feature_repo"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_events_repo(root: Path, live_repo: Path, project: str) -> Path:
    """The events repo under ``root``, written and ``feast apply``'d when missing: the
    live set's online store, project ``project``. Safe from several processes.

    Raises:
        ArtifactError: the live set's ``feature_store.yaml`` is unreadable.
    """
    import yaml

    repo = events_repo(root)
    with _locked(repo.parent / ".lock"):
        if (repo / "registry.db").is_file():
            return repo
        try:
            cfg = yaml.safe_load((Path(live_repo) / "feature_store.yaml").read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ArtifactError(
                f"events: cannot read the live set's feature_store.yaml: {e}"
            ) from None
        online = dict(cfg.get("online_store") or {"type": "sqlite", "path": "online_store.db"})
        if online.get("type", "sqlite") == "sqlite":  # the same file, from another folder
            db = Path(online.get("path", "online_store.db"))
            online["path"] = str(db if db.is_absolute() else (Path(live_repo) / db).resolve())
        cfg.update(project=project, registry="registry.db", online_store=online)
        data = repo / "data"
        data.mkdir(parents=True, exist_ok=True)
        for spec in EVENT_VIEWS:
            empty = _snapshot(spec, [], [], datetime.now(UTC))
            empty.to_parquet(data / f"{spec.name}.parquet", index=False)
        (repo / "feature_store.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        (repo / "repo.py").write_text(REPO_MODULE)
        from feast import FeatureStore

        FeatureStore(repo_path=str(repo)).apply(event_definitions(data))  # type: ignore[arg-type]
        log.info("events: Feast repo %s applied (project %s)", repo, project)
    return repo


def _snapshot(spec: ViewSpec, ids: list[int], rows: list[list[Any]], at: datetime) -> pd.DataFrame:
    frame: dict[str, Any] = {spec.join_key: pd.Series(ids, dtype="int64")}
    for j, f in enumerate(spec.features):
        values = [r[j] for r in rows]
        frame[f.name] = pd.Series(values, dtype="int64" if f.kind == "int64" else object)
    frame["event_timestamp"] = pd.Series([at] * len(ids), dtype="datetime64[us, UTC]")
    return pd.DataFrame(frame)


# --------------------------------------------------------------- serving --


def with_events(user: FeatureFrame, events: FeatureFrame | None, recent: int) -> FeatureFrame:
    """``user`` (one row of the user view) with what events added since the build:
    seen items united, the recent list continued by the rated items (the last
    ``recent``), later rating of an item moving it to the end."""
    if events is None or not events.found[0]:
        return user
    seen = np.union1d(user.lists("seen_item_ids")[0], events.lists("event_seen_item_ids")[0])
    fresh = events.lists("event_recent_item_ids")[0]
    before = user.lists("recent_item_ids")[0]
    merged = np.concatenate([before[~np.isin(before, fresh)], fresh])[-recent:]
    columns = dict(user.columns)
    columns["seen_item_ids"] = [seen.astype(np.int64)]
    columns["recent_item_ids"] = [merged.astype(np.int64)]
    return FeatureFrame(ids=user.ids, found=user.found, columns=columns)


# ----------------------------------------------------------------- worker --

# KEYS: none (single node). ARGV: prefix, dedupe ttl, recent, max seen, window,
# then 5 per event: id, user, item, type, ts_ms. Returns applied, duplicates,
# TIME seconds, TIME microseconds; adds the first two to the stats hash.
APPLY = """
local p, ttl, recent, max_seen, window = ARGV[1], ARGV[2], tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
local applied, dup = 0, 0
for i = 6, #ARGV, 5 do
  local id, user, item, kind, ts = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  if redis.call('SET', p .. 'done:' .. id, '1', 'NX', 'EX', ttl) then
    applied = applied + 1
    if kind == 'rating' then
      local seen, rec = p .. 'seen:{' .. user .. '}', p .. 'recent:{' .. user .. '}'
      redis.call('ZADD', seen, ts, item)
      redis.call('ZREMRANGEBYRANK', seen, 0, -(max_seen + 1))
      redis.call('ZADD', rec, ts, item)
      redis.call('ZREMRANGEBYRANK', rec, 0, -(recent + 1))
    end
    local bucket = p .. 'item:{' .. item .. '}:' .. math.floor(tonumber(ts) / 1000 / window)
    redis.call('HINCRBY', bucket, kind, 1)
    redis.call('EXPIRE', bucket, 3 * window)
  else
    dup = dup + 1
  end
end
redis.call('HINCRBY', p .. 'stats', 'applied', applied)
redis.call('HINCRBY', p .. 'stats', 'duplicates', dup)
local t = redis.call('TIME')
return {applied, dup, tonumber(t[1]), tonumber(t[2])}
"""

FIELDS = ("id", "user", "item", "type", "value", "ts")


def check_entry(fields: dict[bytes, bytes]) -> tuple[dict[str, str] | None, str]:
    """A stream entry as text fields, or None and why it cannot be applied."""
    try:
        entry = {k.decode(): v.decode() for k, v in fields.items()}
    except UnicodeDecodeError:
        return None, "not UTF-8"
    missing = [f for f in FIELDS if f not in entry]
    if missing:
        return None, f"missing fields {missing}"
    if not _ID.fullmatch(entry["id"]):
        return None, "bad event id"
    if entry["type"] not in COUNTED:
        return None, f"unknown type {entry['type'][:32]!r}"
    try:
        user, item, ts, value = (
            int(entry["user"]),
            int(entry["item"]),
            int(entry["ts"]),
            float(entry["value"]),
        )
    except ValueError as e:
        return None, f"not a number: {e}"
    if user < 0 or item < 0 or ts <= 0 or not math.isfinite(value):
        return None, "user, item and ts must be positive numbers, value finite"
    return entry, ""


def trim_stream(r: Any, stream: str) -> int:
    """Delete the entries every consumer group of ``stream`` has read and
    acknowledged (below each group's oldest pending entry, or its last delivered
    one); returns how many. A group created later (an archiver started after the
    fact) sees only what is left, so start the groups you need first."""
    groups = r.xinfo_groups(stream)
    if not groups:
        return 0
    floors = []
    for g in groups:
        name = g["name"]
        pending = r.xpending(stream, name)
        if pending["pending"]:
            floors.append(_id(pending["min"]))
        else:  # everything delivered is acknowledged: keep from the next one on
            ms, seq = _id(g["last-delivered-id"])
            floors.append((ms, seq + 1))
    ms, seq = min(floors)
    return int(r.xtrim(stream, minid=f"{ms}-{seq}", approximate=False))


def _id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class WorkerStats:
    read: int = 0
    applied: int = 0
    duplicates: int = 0
    dead: int = 0
    claimed: int = 0
    trimmed: int = 0


class EventWorker:
    """One consumer of the group (``sieve events``); ``run_once`` handles one batch."""

    def __init__(self, config: EventsConfig, repo: Path, consumer: str) -> None:
        import redis
        from feast import FeatureStore

        self.config = config
        self.consumer = consumer
        self.redis = redis.Redis.from_url(config.redis_url, socket_timeout=10.0)
        self.apply = self.redis.register_script(APPLY)
        self.store = FeatureStore(repo_path=str(repo))
        self.stats = WorkerStats()
        self._trimmed = time.monotonic()
        try:
            self.redis.xgroup_create(config.stream, config.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def run_once(self) -> int:
        """Claim what dead workers left, else read new entries; handle them. Returns
        how many entries were handled (0: none waiting)."""
        c = self.config
        _, claimed, *_ = self.redis.xautoclaim(  # type: ignore[misc]
            c.stream, c.group, self.consumer, c.claim_idle_ms, "0-0", count=c.batch
        )
        entries = [(i, f) for i, f in claimed if f]  # a deleted entry claims as None
        self.stats.claimed += len(entries)
        if not entries:
            got = self.redis.xreadgroup(
                c.group, self.consumer, {c.stream: ">"}, count=c.batch, block=c.block_ms
            )
            entries = [(i, f) for _, batch in got or () for i, f in batch]  # type: ignore[union-attr]
        if entries:
            self.handle(entries)
        if c.trim_s and time.monotonic() - self._trimmed >= c.trim_s:
            self._trimmed = time.monotonic()
            self.stats.trimmed += trim_stream(self.redis, c.stream)
        return len(entries)

    def handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        c = self.config
        good: list[dict[str, str]] = []
        for entry_id, fields in entries:
            entry, why = check_entry(fields)
            if entry is None:
                dead = {k: v for k, v in fields.items()}
                dead.update({b"reason": why.encode(), b"entry": entry_id})
                self.redis.xadd(c.dead_letter, dead)  # type: ignore[arg-type]
                self.stats.dead += 1
                log.warning("events: entry %s to %s: %s", entry_id.decode(), c.dead_letter, why)
            else:
                good.append(entry)
        if good:
            argv: list[Any] = [c.prefix, c.dedupe_ttl_s, c.recent, c.max_seen, c.window_s]
            for e in good:
                argv += [e["id"], e["user"], e["item"], e["type"], e["ts"]]
            applied, dup, sec, usec = self.apply(args=argv)
            self.stats.applied += int(applied)
            self.stats.duplicates += int(dup)
            at = datetime.fromtimestamp(int(sec), UTC) + timedelta(microseconds=int(usec))
            self._push(
                sorted({int(e["user"]) for e in good}), sorted({int(e["item"]) for e in good}), at
            )
        self.redis.xack(c.stream, c.group, *[i for i, _ in entries])
        self.stats.read += len(entries)

    def _push(self, users: list[int], items: list[int], at: datetime) -> None:
        """Each touched user's and item's state, read after the apply, into the
        online store through Feast (stamped ``at``: a newer snapshot wins)."""
        c = self.config
        window_now = int(at.timestamp()) // c.window_s
        with self.redis.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.zrange(f"{c.prefix}seen:{{{u}}}", 0, -1)
                pipe.zrange(f"{c.prefix}recent:{{{u}}}", 0, -1)
            for it in items:
                for b in (window_now - 1, window_now):
                    pipe.hgetall(f"{c.prefix}item:{{{it}}}:{b}")
            got = pipe.execute()
        user_rows = [
            [[int(x) for x in got[2 * n]], [int(x) for x in got[2 * n + 1]]]
            for n in range(len(users))
        ]
        base = 2 * len(users)
        item_rows = []
        for n in range(len(items)):
            prev, now = got[base + 2 * n], got[base + 2 * n + 1]
            item_rows.append(
                [int(prev.get(t.encode(), 0)) + int(now.get(t.encode(), 0)) for t in COUNTED]
            )
        from feast.data_source import PushMode

        self.store.push(
            f"{USER_EVENTS_VIEW.name}_push",
            _snapshot(USER_EVENTS_VIEW, users, user_rows, at),
            to=PushMode.ONLINE,
        )
        self.store.push(
            f"{ITEM_EVENTS_VIEW.name}_push",
            _snapshot(ITEM_EVENTS_VIEW, items, item_rows, at),
            to=PushMode.ONLINE,
        )

    def close(self) -> None:
        self.redis.close()
