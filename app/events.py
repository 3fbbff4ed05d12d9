"""``sieve events``: one worker of the feedback loop's consumer group
(``features/events.py``), until SIGTERM or SIGINT; a line of counts every
``--report-s`` seconds (and at the end)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

import redis

from app.config import SieveConfig
from features.event_log import EventArchiver
from features.events import EventWorker, ensure_events_repo
from sieve import artifacts

log = logging.getLogger("sieve.events")


def run_worker(
    cfg: SieveConfig,
    root: Path,
    consumer: str = "",
    report_s: float = 10.0,
    once: bool = False,
    archive: Path | None = None,
) -> int:
    """Run a worker on the artifact root ``root`` (its live set's online store), or
    with ``archive``, an archiver writing the events as Parquet there.

    Raises:
        ArtifactError: no live set, or its feature repo is unreadable.
        redis.RedisError: the stream's Redis does not answer.
    """
    ev = cfg.ranker.events
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    worker: EventWorker | EventArchiver
    if archive is not None:
        worker = EventArchiver(ev, archive, name)
    else:
        aset = artifacts.load(root)
        repo = ensure_events_repo(root, aset.verified("feature_store").parent, ev.feast_project)
        worker = EventWorker(ev, repo, name)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    group = ev.archive_group if archive is not None else ev.group
    print(f"events {'archiver' if archive else 'worker'} {name} on {ev.stream} (group {group})",
          flush=True)  # fmt: skip
    last = time.monotonic()
    backoff = 0.1
    try:
        while not stopping:
            try:
                handled = worker.run_once()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                # Redis restarting: what this worker read and did not acknowledge
                # stays pending, for it (or another) to claim once Redis is back.
                log.warning("events: Redis unavailable (%s); retrying in %.1f s", e, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if once and handled == 0:
                break
            if time.monotonic() - last >= report_s:
                last = time.monotonic()
                log.info("events: %s", _stats(worker))
    finally:
        worker.close()
        log.info("events: %s", _stats(worker))
    return 0


def _stats(worker: EventWorker | EventArchiver) -> object:
    return worker.stats if isinstance(worker, EventWorker) else f"archived={worker.archived}"
