"""The artifact sets a service holds, and their lifecycle: one holder, both services.

    load beside the live set -> (verify and warm: the loader's job) -> ready?
    -> swap in one assignment -> keep N -> retire the dropped ones after their
    last request -> free them off the event loop

A request takes a set with ``use()`` and keeps it to its end, so no request mixes
two versions; the holder counts the requests on each set, so a dropped set is
closed (its connections) only once its last request has finished, and freed on
a worker thread (a 1M-item set's index and embeddings take tens of ms to free,
which would stall every call on the loop). A set that fails to load is refused,
logged once, and skipped until ``CURRENT`` names another version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from sieve import artifacts
from sieve.errors import ArtifactError, NotReady, VersionNotLoaded
from sieve.metrics import RELOADS, set_live_version
from sieve.validation import echo

log = logging.getLogger(__name__)


class Versioned(Protocol):
    @property
    def version(self) -> str: ...


S = TypeVar("S", bound=Versioned)


async def release_off_loop(held: list[Any]) -> None:
    """Drop the references in ``held`` (the caller's last ones) on a worker thread,
    so what they free is freed there, not on the event loop."""
    await asyncio.to_thread(held.clear)


class VersionHolder(Generic[S]):
    """Up to ``keep`` loaded sets, newest (live) first.

    Args:
        root: the artifacts root whose ``CURRENT`` names the live version.
        load: loads, verifies and warms one version (raises ``ArtifactError`` to
            refuse it); runs beside the live set, which keeps serving.
        keep: sets held: the live one and the ones before it, for requests pinned
            to them.
        ready: whether a loaded set may go live now (e.g. the ranker waits until
            the candidate service holds the same version); until it says yes the
            set waits, loaded, and each ``reload`` asks again.
        close: releases what a retired set holds open (connections), after its
            last request.
        name: the service, for logs.
        logger: where loads, refusals and swaps are logged (the service's own).
    """

    def __init__(
        self,
        root: Path,
        load: Callable[[str], Awaitable[S]],
        keep: int = 1,
        ready: Callable[[S], Awaitable[bool]] | None = None,
        close: Callable[[S], Awaitable[None]] | None = None,
        name: str = "service",
        logger: logging.Logger = log,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self._load, self._ready, self._close = load, ready, close
        self.keep, self.name, self._log = keep, name, logger
        # Replaced as one tuple, never mutated: a request sees the old or the new one.
        self._held: tuple[S, ...] = ()
        self._pending: S | None = None  # loaded, waiting for ``ready``
        self._refused = ""  # a version that failed to load, skipped until CURRENT moves on
        self._lock = asyncio.Lock()
        # Requests running per version (a refreshed set of the same version shares
        # its connections), and events that wake a retirement.
        self._in_flight: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}

    @property
    def live(self) -> S | None:
        return self._held[0] if self._held else None

    @property
    def version(self) -> str:
        """The live version; empty before ``start``."""
        return self._held[0].version if self._held else ""

    @property
    def versions(self) -> tuple[str, ...]:
        """Every held version, newest first."""
        return tuple(s.version for s in self._held)

    def in_flight(self, state: S) -> int:
        return self._in_flight.get(state.version, 0)

    async def start(self) -> S:
        """Load the version ``CURRENT`` names and hold it as the live set.

        Raises:
            ArtifactError: naming the missing or corrupt file.
        """
        state = await self._load(artifacts.current_version(self.root))
        self._held = (state,)
        set_live_version(self.name, state.version)
        for outcome in ("swapped", "refused"):  # at 0 from the start: increase() is defined
            RELOADS.labels(self.name, outcome)
        return state

    def pick(self, version: str = "") -> S:
        """The set a request is served from: ``version``, or the live one when empty.

        Raises:
            NotReady: nothing is loaded yet.
            VersionNotLoaded: ``version`` is not held; names the held ones.
        """
        held = self._held
        if not held:
            raise NotReady(f"{self.name} has no artifact set loaded yet")
        if not version:
            return held[0]
        for state in held:
            if state.version == version:
                return state
        names = ", ".join(s.version for s in held)
        del held  # the traceback of the error must not keep a set alive
        raise VersionNotLoaded(
            f"artifact version {echo(version)} is not loaded here; loaded: {names} (newest first)"
        )

    @contextmanager
    def use(self, version: str = "") -> Iterator[S]:
        """``pick(version)``, counted as in flight until the block ends, so the set
        is not retired under the request."""
        state = self.pick(version)
        key = state.version
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            yield state
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
                idle = self._idle.pop(key, None)
                if idle is not None:
                    idle.set()

    async def reload(self) -> bool:
        """Go live with the version ``CURRENT`` names, if it is not live already.

        A held version (a rollback) moves to the front without loading; a new one
        is loaded beside the live set (once: it waits, loaded, across calls until
        ``ready`` says yes); the swap is one assignment. Sets past ``keep`` are
        retired. A set that fails to load is refused (logged once) and the live
        one keeps serving.

        Returns:
            Whether the live set changed.
        """
        async with self._lock:
            live = self.live
            if live is None:
                return False
            try:
                target = artifacts.current_version(self.root)
            except ArtifactError as e:
                self._log.error("artifact reload: %s; still serving %s", e, live.version)
                return False
            pending = self._pending
            if pending is not None and pending.version != target:
                # CURRENT moved on before the set could go live: no request took it.
                self._log.info("%s dropped %s (never live): CURRENT names %s", self.name,
                         pending.version, target)  # fmt: skip
                stale, pending, self._pending = [pending], None, None
                await self._retire(stale)
            if target in (live.version, self._refused):
                return False
            if pending is None:
                pending = next((s for s in self._held if s.version == target), None)
            if pending is None:
                try:
                    pending = await self._load(target)
                except ArtifactError as e:
                    self._refused = target
                    RELOADS.labels(self.name, "refused").inc()
                    self._log.error("%s refused artifact set %s: %s; still serving %s",
                              self.name, target, e, live.version)  # fmt: skip
                    return False
                self._log.info("%s loaded %s beside %s", self.name, target, live.version)
            if self._ready is not None and not await self._ready(pending):
                self._pending = pending
                return False
            self._pending = None
            before = self._held
            self._held = (pending, *(s for s in before if s is not pending))[: self.keep]
            dropped = [s for s in before if s not in self._held]
            self._log.info("%s swapped artifact set: %s -> %s (held: %s)", self.name,
                     live.version, pending.version, ", ".join(self.versions))  # fmt: skip
            RELOADS.labels(self.name, "swapped").inc()
            set_live_version(self.name, pending.version, live.version)
            del before, live, pending
            await self._retire(dropped)
            return True

    def replace(self, old: S, new: S) -> bool:
        """Put ``new`` (the same version, refreshed) where ``old`` is live, unless a
        reload swapped sets meanwhile. Requests that took ``old`` finish on it; they
        are counted under its version, so its resources stay open for them."""
        if self.live is not old:
            return False
        if new.version != old.version:
            raise ValueError(f"replace keeps the version: {old.version} -> {new.version}")
        self._held = (new, *self._held[1:])
        return True

    async def _retire(self, dropped: list[S]) -> None:
        """Close each of ``dropped`` once no request that took it is running, then
        drop the holder's references on a worker thread."""
        for i in range(len(dropped)):
            key = dropped[i].version
            if self._in_flight.get(key):
                idle = self._idle.setdefault(key, asyncio.Event())
                await idle.wait()
            if self._close is not None:
                await self._close(dropped[i])
        held: list[Any] = list(dropped)
        dropped.clear()
        await release_off_loop(held)

    async def close(self) -> None:
        """Close every held set and the pending one (the service is stopping)."""
        if self._close is not None:
            for state in (*self._held, *([self._pending] if self._pending else [])):
                await self._close(state)
        self._held, self._pending = (), None
