"""Feature logging: the exact model rows a sample of Ranks scored, as Parquet.

``[ranker.feature_log] sample = 0.01`` and ``dir``: for that share of Ranks the
ranker hands the scored candidates (ids, sources, learned ranks, item-to-item
scores and the model's input matrix as served) to a writer thread, which writes
``DIR/date=YYYY-MM-DD/<host>-<pid>-<n>.parquet`` every ``flush_rows`` rows or
``flush_s`` seconds: the request path pays for a copy and a queue put. A full
queue drops the sample (counted), never delays a Rank.

``app/skew.py`` (``sieve skew``) compares these rows with the rows the training
code computes for the same user and candidates: training-serving skew per feature.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from sieve.config import Frozen

log = logging.getLogger(__name__)


class FeatureLogConfig(Frozen):
    """``[ranker.feature_log]``: off by default."""

    sample: float = Field(0.0, ge=0.0, le=1.0)
    """Share of Ranks whose scored rows are logged."""
    dir: str = ""
    flush_rows: int = Field(20_000, ge=1)
    flush_s: float = Field(5.0, gt=0.0)
    queue: int = Field(256, ge=1)
    """Ranks waiting for the writer; past it a sample is dropped."""

    @model_validator(mode="after")
    def _where(self) -> FeatureLogConfig:
        if self.sample > 0 and not self.dir:
            raise ValueError("feature_log.sample > 0 needs feature_log.dir (where to write)")
        return self


class FeatureLog:
    """The ranker's sampler and writer thread."""

    def __init__(self, config: FeatureLogConfig) -> None:
        self.config = config
        self.dir = Path(config.dir)
        self.dropped = 0
        self.written = 0
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(config.queue)
        self._n = 0
        self._prefix = f"{socket.gethostname()}-{os.getpid()}"
        self._thread = threading.Thread(target=self._run, name="feature-log", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        s = self.config.sample
        return s > 0.0 and (s >= 1.0 or random.random() < s)

    def put(
        self, request_id: str, user_id: int, version: str, features: list[str], rows: Any
    ) -> None:
        """Queue one Rank's scored rows (``ranker.stages.Rows``; ``features``: the
        names of ``rows.x``'s columns, the set's model's)."""
        item = {
            "request_id": request_id, "user_id": user_id, "version": version,
            "features": features,
            "time_ms": int(time.time() * 1000), "item_id": rows.ids.copy(),
            "sources": rows.sources.copy(), "learned_rank": rows.ranks.copy(),
            "i2i": rows.i2i.copy(), "x": rows.x.copy(),
        }  # fmt: skip
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(30)

    def _run(self) -> None:
        buffered: list[dict[str, Any]] = []
        n_rows = 0
        since = time.monotonic()
        while True:
            try:
                item = self._q.get(timeout=self.config.flush_s)
            except queue.Empty:
                item = {}
            if item:
                buffered.append(item)
                n_rows += len(item["item_id"])
            done = item is None
            if buffered and (
                done or n_rows >= self.config.flush_rows
                or time.monotonic() - since >= self.config.flush_s
            ):  # fmt: skip
                try:
                    self._write(buffered)
                except Exception:  # noqa: BLE001 - a failed write loses the sample only
                    log.exception("feature log: writing %d rows failed", n_rows)
                buffered, n_rows, since = [], 0, time.monotonic()
            if done:
                return

    def _write(self, items: list[dict[str, Any]]) -> None:
        frames = []
        for it in items:
            n = len(it["item_id"])
            cols: dict[str, Any] = {
                "request_id": [it["request_id"]] * n,
                "user_id": np.full(n, it["user_id"], np.int64),
                "version": [it["version"]] * n,
                "time_ms": np.full(n, it["time_ms"], np.int64),
                "item_id": it["item_id"],
                "sources": it["sources"],
                "learned_rank": it["learned_rank"],
                "i2i": it["i2i"],
            }
            for j, name in enumerate(it["features"]):
                cols[f"f_{name}"] = it["x"][:, j]
            frames.append(pd.DataFrame(cols))
        frame = pd.concat(frames, ignore_index=True)
        date = time.strftime("%Y-%m-%d", time.gmtime(items[0]["time_ms"] / 1000))
        folder = self.dir / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        self._n += 1
        path = folder / f"{self._prefix}-{self._n:06d}.parquet"
        tmp = path.with_suffix(".tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(path)
        self.written += len(frame)


def read_feature_log(folder: Path) -> pd.DataFrame:
    parts = sorted(Path(folder).glob("date=*/*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no feature log files under {folder}")
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
