"""The version holder both services keep their artifact sets in: load beside the
live set, swap in one assignment, keep N, retire after the last request, free off
the event loop, refuse a bad set and keep serving."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sieve import artifacts
from sieve.errors import ArtifactError, NotReady, VersionNotLoaded
from sieve.versions import VersionHolder


@dataclass(eq=False)
class Fake:
    """A loaded set: its version, and whether its connections were closed."""

    version: str
    closed: bool = False
    payload: list[int] = field(default_factory=lambda: list(range(1000)))


class Loader:
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.bad: set[str] = set()

    async def __call__(self, version: str) -> Fake:
        if version in self.bad:
            raise ArtifactError(f"{version} is corrupt")
        self.loaded.append(version)
        return Fake(version)


def publish(root: Path, version: str) -> None:
    """Name ``version`` in ``CURRENT`` (its folder holds a manifest file: the loader
    here is a fake, so what the file says is never read)."""
    folder = root / "versions" / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / artifacts.MANIFEST).write_text("{}")
    artifacts.publish(root, version)


async def close(state: Fake) -> None:
    state.closed = True


def holder(tmp_path: Path, loader: Loader, keep: int = 1, **kw) -> VersionHolder[Fake]:  # type: ignore[no-untyped-def]
    return VersionHolder(tmp_path, loader, keep=keep, close=close, name="test", **kw)


async def test_start_swap_keep_and_rollback(tmp_path: Path) -> None:
    loader = Loader()
    sets = holder(tmp_path, loader, keep=2)
    with pytest.raises(NotReady):
        sets.pick()
    publish(tmp_path, "v1")
    first = await sets.start()
    assert sets.version == "v1" and sets.pick() is first
    assert not await sets.reload()  # nothing new
    publish(tmp_path, "v2")
    assert await sets.reload()
    assert sets.versions == ("v2", "v1") and sets.pick("v1") is first
    with pytest.raises(VersionNotLoaded, match="'v9' is not loaded here; loaded: v2, v1"):
        sets.pick("v9")
    publish(tmp_path, "v3")
    assert await sets.reload()
    assert sets.versions == ("v3", "v2") and first.closed  # past keep: retired
    publish(tmp_path, "v2")  # a rollback to a held set: no load
    assert await sets.reload()
    assert sets.versions == ("v2", "v3") and loader.loaded == ["v1", "v2", "v3"]


async def test_a_refused_set_is_skipped_and_the_live_one_serves(tmp_path: Path) -> None:
    loader = Loader()
    sets = holder(tmp_path, loader)
    publish(tmp_path, "v1")
    await sets.start()
    loader.bad.add("v2")
    publish(tmp_path, "v2")
    assert not await sets.reload()
    assert not await sets.reload()  # refused once, not retried while CURRENT names it
    assert sets.version == "v1" and loader.loaded == ["v1"]
    (tmp_path / artifacts.CURRENT).unlink()
    assert not await sets.reload()  # CURRENT gone: logged, still serving
    publish(tmp_path, "v3")
    assert await sets.reload() and sets.version == "v3"


async def test_a_set_waits_loaded_until_ready(tmp_path: Path) -> None:
    loader = Loader()
    ready = {"ok": False}

    async def is_ready(state: Fake) -> bool:
        return ready["ok"]

    sets = holder(tmp_path, loader, ready=is_ready)
    publish(tmp_path, "v1")
    await sets.start()
    publish(tmp_path, "v2")
    assert not await sets.reload() and not await sets.reload()
    assert sets.version == "v1" and loader.loaded == ["v1", "v2"]  # loaded once
    publish(tmp_path, "v3")  # CURRENT moved on: the waiting set is dropped
    assert not await sets.reload()
    assert loader.loaded == ["v1", "v2", "v3"]
    ready["ok"] = True
    assert await sets.reload() and sets.version == "v3"


async def test_retirement_waits_for_the_last_request(tmp_path: Path) -> None:
    sets = holder(tmp_path, Loader())
    publish(tmp_path, "v1")
    await sets.start()
    publish(tmp_path, "v2")
    with sets.use() as old:
        reload = asyncio.create_task(sets.reload())
        await asyncio.sleep(0.01)
        assert sets.version == "v2"  # the swap is done at once
        assert not old.closed and not reload.done()  # retirement waits for us
        assert sets.in_flight(old) == 1
    assert await reload and old.closed


async def test_a_retired_set_is_freed_on_a_worker_thread(tmp_path: Path) -> None:
    sets = holder(tmp_path, Loader())
    publish(tmp_path, "v1")
    await sets.start()
    freed_on: list[str] = []
    with sets.use() as state:
        weakref.finalize(state, lambda: freed_on.append(threading.current_thread().name))
    del state
    publish(tmp_path, "v2")
    assert await sets.reload()
    gc.collect()
    assert freed_on and freed_on != [threading.current_thread().name], freed_on


async def test_a_refreshed_set_replaces_the_live_one_unless_swapped(tmp_path: Path) -> None:
    sets = holder(tmp_path, Loader())
    publish(tmp_path, "v1")
    live = await sets.start()
    fresh = Fake("v1")
    assert sets.replace(live, fresh) and sets.pick() is fresh
    assert not sets.replace(live, Fake("v1"))  # no longer live: a reload came first
    with pytest.raises(ValueError, match="keeps the version"):
        sets.replace(fresh, Fake("v2"))
