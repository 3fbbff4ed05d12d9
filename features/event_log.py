"""The feedback loop's offline half: the event stream archived as Parquet, read back
for training.

``sieve events --archive DIR`` runs an ``EventArchiver``: a consumer of its own
group (``archive_group``, so it sees every event the appliers see, at its own
pace) that buffers entries and, every ``archive_flush_s`` or ``archive_rows``
entries, writes them to ``DIR/date=YYYY-MM-DD/part-<first entry id>.parquet``
(the event's UTC date; fsynced, then renamed into place) and only then
acknowledges them. A killed archiver leaves its buffer pending: it or another
claims it after ``claim_idle_ms`` and writes it again, so a file can repeat
events of another; ``read_event_log`` drops repeats by event id.

``merge_ratings`` turns the log's ratings into MovieLens rating rows for
``sieve build --events DIR``: the build's time split then holds the later ones
out, exactly as it does the CSV's.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from features.events import EventsConfig, check_entry

log = logging.getLogger(__name__)

COLUMNS = {
    "event_id": "string",
    "user_id": "int64",
    "item_id": "int64",
    "type": "string",
    "value": "float32",
    "timestamp_ms": "int64",
    "request_id": "string",
    "artifact_version": "string",
    "stream_id": "string",
}


def frame_of(entries: list[tuple[str, dict[str, str]]]) -> pd.DataFrame:
    """Checked stream entries (stream id, fields) as the log's columns."""
    rows = [
        {
            "event_id": e["id"],
            "user_id": int(e["user"]),
            "item_id": int(e["item"]),
            "type": e["type"],
            "value": float(e["value"]),
            "timestamp_ms": int(e["ts"]),
            "request_id": e.get("request", ""),
            "artifact_version": e.get("version", ""),
            "stream_id": sid,
        }  # fmt: skip
        for sid, e in entries
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(COLUMNS)


def write_parts(out: Path, frame: pd.DataFrame) -> list[Path]:
    """``frame`` as one Parquet file per UTC date, each written whole or not at all."""
    written = []
    dates = pd.to_datetime(frame["timestamp_ms"], unit="ms", utc=True).dt.strftime("%Y-%m-%d")
    for date, part in frame.groupby(dates, sort=True):
        folder = Path(out) / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-{part['stream_id'].iloc[0].replace('-', '_')}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        part.to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
        written.append(path)
    return written


def read_event_log(out: Path) -> pd.DataFrame:
    """Every archived event once (repeats dropped by event id), in time order."""
    parts = sorted(Path(out).glob("date=*/part-*.parquet"))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    frame = frame.drop_duplicates("event_id", keep="first")
    return frame.sort_values(["timestamp_ms", "event_id"], kind="stable").reset_index(drop=True)


def merge_ratings(
    ratings: pd.DataFrame, events: pd.DataFrame, item_ids: Any
) -> tuple[pd.DataFrame, dict[str, int]]:
    """MovieLens ``ratings`` (userId, movieId, rating, timestamp in seconds) with the
    log's ratings of catalog items added; a user's later rating of an item replaces
    the earlier one. Returns the rows and what was taken and left."""
    rated = events[events["type"] == "rating"]
    known = rated["item_id"].isin(pd.Index(item_ids))
    rows = pd.DataFrame({
        "userId": rated.loc[known, "user_id"].astype(ratings["userId"].dtype),
        "movieId": rated.loc[known, "item_id"].astype(ratings["movieId"].dtype),
        "rating": rated.loc[known, "value"].astype(ratings["rating"].dtype),
        "timestamp": (rated.loc[known, "timestamp_ms"] // 1000).astype(ratings["timestamp"].dtype),
    })  # fmt: skip
    merged = pd.concat([ratings, rows], ignore_index=True)
    merged = merged.sort_values("timestamp", kind="stable")
    merged = merged.drop_duplicates(["userId", "movieId"], keep="last")
    merged = merged.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    stats = {
        "event_ratings": int(len(rated)),
        "unknown_items": int((~known).sum()),
        "replaced": int(len(ratings) + len(rows) - len(merged)),
    }
    return merged.reset_index(drop=True), stats


class EventArchiver:
    """One consumer of the archive group; ``run_once`` reads, ``flush`` writes."""

    def __init__(self, config: EventsConfig, out: Path, consumer: str) -> None:
        import redis

        self.config = config
        self.out = Path(out)
        self.consumer = consumer
        self.redis = redis.Redis.from_url(config.redis_url, socket_timeout=10.0)
        self.buffer: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.since = time.monotonic()
        self.archived = 0
        try:
            self.redis.xgroup_create(config.stream, config.archive_group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def run_once(self) -> int:
        c = self.config
        _, claimed, *_ = self.redis.xautoclaim(  # type: ignore[misc]
            c.stream, c.archive_group, self.consumer, c.claim_idle_ms, "0-0", count=c.batch
        )
        held = {i for i, _ in self.buffer}
        entries = [(i, f) for i, f in claimed if f and i not in held]
        if not entries:
            got = self.redis.xreadgroup(
                c.archive_group, self.consumer, {c.stream: ">"}, count=c.batch, block=c.block_ms
            )
            entries = [(i, f) for _, batch in got or () for i, f in batch]  # type: ignore[union-attr]
        self.buffer += entries
        if self.buffer and (
            len(self.buffer) >= c.archive_rows or time.monotonic() - self.since >= c.archive_flush_s
        ):
            self.flush()
        return len(entries)

    def flush(self) -> None:
        """Write the buffer (the valid entries), then acknowledge all of it."""
        if not self.buffer:
            return
        good = []
        for entry_id, fields in self.buffer:
            entry, _ = check_entry(fields)  # malformed: the appliers' dead letters
            if entry is not None:
                good.append((entry_id.decode(), entry))
        if good:
            write_parts(self.out, frame_of(good))
        self.redis.xack(self.config.stream, self.config.archive_group, *[i for i, _ in self.buffer])
        self.archived += len(good)
        self.buffer = []
        self.since = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.redis.close()
