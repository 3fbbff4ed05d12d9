"""Item features held in process memory: the serving path gathers 1000 rows in
microseconds instead of reading the online store per request."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.definitions import ITEM_VIEW
from features.reader import FeatureFrame, OnlineReader, open_reader, read_all
from sieve.ids import IdIndex

log = logging.getLogger(__name__)

CHILD_NICE = 10
"""CPU priority the reading child gives up: live requests come first."""


@dataclass(frozen=True)
class ItemTable:
    """Item features by id. ``columns`` follow ``FeatureFrame`` (n = len(ids))."""

    ids: np.ndarray  # int64 [n], as loaded (catalog order)
    columns: dict[str, np.ndarray]
    _index: IdIndex

    @classmethod
    def from_frame(cls, frame: FeatureFrame) -> ItemTable:
        keep = frame.found
        cols = {name: np.asarray(col)[keep] for name, col in frame.columns.items()}
        ids = frame.ids[keep]
        return cls(ids=ids, columns=cols, _index=IdIndex(ids))

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row indices int64 [m], found bool [m]); rows of unknown ids are 0."""
        return self._index.rows(item_ids)

    def take(self, names: Iterable[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Columns ``names`` at ``rows`` (from ``rows()``). ``np.take`` along the
        first axis: twice as fast as fancy indexing for 1200 random rows of a
        million (233 -> 104 us for the five model inputs)."""
        return {name: np.take(self.columns[name], rows, axis=0) for name in names}

    def __len__(self) -> int:
        return len(self.ids)


async def load_item_table(
    reader: OnlineReader,
    item_ids: np.ndarray,
    repo: Path | None = None,
    process_min_items: int | None = None,
) -> ItemTable:
    """Read every item's features into an ``ItemTable``.

    With ``repo`` (the feature repo ``reader`` reads) and at least
    ``process_min_items`` ids, a child process opens its own reader on ``repo``
    and does the reading at low CPU priority: decoding a million rows holds the
    GIL for tens of seconds, which would stall the live requests of this
    process. Otherwise ``reader`` reads here, in ``read_all``'s small batches.
    Either way the id index is sorted in a worker thread.
    """
    ids = np.asarray(item_ids, np.int64)
    frame: FeatureFrame | None = None
    if repo is not None and process_min_items is not None and len(ids) >= process_min_items:
        frame = await _read_in_child(repo, ids)
    if frame is None:
        frame = await read_all(reader, ITEM_VIEW, ids)
    return await asyncio.to_thread(ItemTable.from_frame, frame)


async def _read_in_child(repo: Path, ids: np.ndarray) -> FeatureFrame | None:
    """``read_all`` of ``ids`` in a spawned child (gRPC and asyncio do not
    survive a fork). None when the child could not run (then the caller reads in
    process); the store's own errors (a refused connection) propagate."""
    loop = asyncio.get_running_loop()
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        return await loop.run_in_executor(pool, read_items, str(repo), ids)
    except (BrokenProcessPool, OSError) as e:
        log.warning("item table: the reading child failed (%s); reading in process", e)
        return None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def read_items(repo: str, ids: np.ndarray, nice: int = CHILD_NICE) -> FeatureFrame:
    """Every item of ``ids`` from the online store of feature repo ``repo`` (the
    child's entry point; lowers its own CPU priority by ``nice`` first)."""
    if nice:
        os.nice(nice)

    async def read() -> FeatureFrame:
        reader = open_reader(Path(repo), max_connections=2, timeout_s=30.0)
        await reader.start()
        try:
            return await read_all(reader, ITEM_VIEW, ids, batch=5000)
        finally:
            await reader.close()

    return asyncio.run(read())
