"""Item features held in process memory: the serving path gathers 1000 rows in
microseconds instead of reading the online store per request."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
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
        first axis, which is faster than fancy indexing for random rows.
        104 vs 233 us for 1200 rows of 1M, five columns (BENCHMARKS.md, Serving)."""
        return {name: np.take(self.columns[name], rows, axis=0) for name in names}

    def __len__(self) -> int:
        return len(self.ids)


async def load_item_table(
    reader: OnlineReader,
    item_ids: np.ndarray,
    repo: Path | None = None,
    process_min_items: int | None = None,
    child: ReadingChild | None = None,
) -> ItemTable:
    """Read every item's features into an ``ItemTable``.

    With ``repo`` (the feature repo ``reader`` reads) and at least
    ``process_min_items`` ids, a child process opens its own reader on ``repo``
    and does the reading at low CPU priority: decoding a million rows holds the
    GIL for tens of seconds, which would stall the live requests of this
    process (``child``: the caller's, started early; see ``ReadingChild``).
    Otherwise ``reader`` reads here, in ``read_all``'s small batches. Either way
    the id index is sorted in a worker thread.
    """
    ids = np.asarray(item_ids, np.int64)
    frame: FeatureFrame | None = None
    if repo is not None and process_min_items is not None and len(ids) >= process_min_items:
        frame = await (child or ReadingChild()).read(repo, ids)
    if frame is None:
        frame = await read_all(reader, ITEM_VIEW, ids)
    return await asyncio.to_thread(ItemTable.from_frame, frame)


class ReadingChild:
    """Reads item tables in a child process (gRPC and asyncio do not survive a
    fork of this one), a fresh child per read, forked from a fork server.

    Starting a child from this process would copy its page tables with the GIL
    held, so the event loop would stand still for as long: 55-67 ms at 8 GB on an
    idle 2-core box, more under load (BENCHMARKS.md, The swap). ``start`` starts
    multiprocessing's fork server while the ranker is small, before it loads a
    set; every later child is forked from that small server, and exits after its
    read, so an idle ranker keeps no reader's memory.

    The child hands each frame over in ``.npy`` files, read here on a worker
    thread, not as its pickled return value: unpickling 200 MB of item columns
    would hold this process's GIL, and so its event loop, in one call.
    """

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self.last_child: tuple[int, int] | None = None  # (pid, parent pid) of the last read

    def start(self) -> None:
        """Start the fork server (blocking, about a second: call it at start-up,
        off the event loop). A read without it starts it then."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    async def read(self, repo: Path, ids: np.ndarray) -> FeatureFrame | None:
        """``read_all`` of ``ids`` in a child; None when the child could not run
        (then the caller reads in process); the store's own errors (a refused
        connection) propagate."""
        loop = asyncio.get_running_loop()
        pool = ProcessPoolExecutor(max_workers=1, mp_context=self._ctx)
        out = Path(tempfile.mkdtemp(prefix="sieve-items-"))
        try:
            self.last_child = await loop.run_in_executor(
                pool, read_items_to, str(repo), ids, str(out)
            )
            return await asyncio.to_thread(load_frame, out)
        except (BrokenProcessPool, OSError) as e:
            log.warning("item table: the reading child failed (%s); reading in process", e)
            return None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            await asyncio.to_thread(shutil.rmtree, out, True)


def read_items_to(repo: str, ids: np.ndarray, out: str, nice: int = CHILD_NICE) -> tuple[int, int]:
    """The child's entry point: ``read_items``, saved into the folder ``out``
    (``save_frame``). Returns the child's process id and its parent's."""
    save_frame(read_items(repo, ids, nice), Path(out))
    return os.getpid(), os.getppid()


def read_items(repo: str, ids: np.ndarray, nice: int = CHILD_NICE) -> FeatureFrame:
    """Every item of ``ids`` from the online store of feature repo ``repo``
    (lowers this process's CPU priority by ``nice`` first: run it in a child)."""
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


_FRAME_INDEX = "frame.json"


def save_frame(frame: FeatureFrame, out: Path) -> None:
    """``frame`` as ``.npy`` files in ``out`` (a list column as its values and
    lengths), named in ``frame.json``."""
    columns = []
    for n, (name, col) in enumerate(frame.columns.items()):
        ragged = not isinstance(col, np.ndarray)
        if ragged:
            lengths = np.array([len(v) for v in col], np.int64)
            np.save(out / f"c{n}_lengths.npy", lengths)
            col = np.concatenate(col) if len(col) else np.empty(0, np.int64)
        np.save(out / f"c{n}.npy", col)
        columns.append({"name": name, "file": f"c{n}", "ragged": ragged})
    np.save(out / "ids.npy", frame.ids)
    np.save(out / "found.npy", frame.found)
    (out / _FRAME_INDEX).write_text(json.dumps(columns))


def load_frame(out: Path) -> FeatureFrame:
    """The ``FeatureFrame`` that ``save_frame`` wrote into ``out``."""
    columns: dict[str, np.ndarray | list[np.ndarray]] = {}
    for c in json.loads((out / _FRAME_INDEX).read_text()):
        values = np.load(out / f"{c['file']}.npy")
        if c["ragged"]:
            ends = np.cumsum(np.load(out / f"{c['file']}_lengths.npy"))
            columns[c["name"]] = np.split(values, ends[:-1]) if len(ends) else []
        else:
            columns[c["name"]] = values
    return FeatureFrame(np.load(out / "ids.npy"), np.load(out / "found.npy"), columns)
