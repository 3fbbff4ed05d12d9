"""What each user was shown recently, for the re-ranker's fatigue rule.

Two stores with one interface: in process (the embedded default; lost on restart,
one process only) and Redis (shared by every ranker replica). Both keep, per
user, the item ids returned in the last ``ttl_s`` seconds, at most ``max_items``
of them (the newest win).

Redis layout: one sorted set per user, ``<prefix>:{<user_id>}`` (a hash tag), member = item id,
score = time shown; each write trims entries past the TTL and the size bound and
sets the key to expire ``ttl_s`` after the user's last request.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ranker.config import HistoryConfig


class ShownHistory(Protocol):
    async def recent(self, user_id: int) -> np.ndarray:
        """Item ids (int64) shown to the user within the TTL, any order."""
        ...

    async def record(self, user_id: int, item_ids: np.ndarray) -> None:
        """Remember that ``item_ids`` were shown to the user now."""
        ...

    async def close(self) -> None: ...


class MemoryHistory:
    """In-process store; the least recently served users go first past ``max_users``."""

    def __init__(
        self,
        ttl_s: float,
        max_items: int,
        max_users: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_items, self.max_users = ttl_s, max_items, max_users
        self._clock = clock
        self._users: OrderedDict[int, dict[int, float]] = OrderedDict()

    async def recent(self, user_id: int) -> np.ndarray:
        shown = self._users.get(user_id)
        if not shown:
            return np.empty(0, np.int64)
        cutoff = self._clock() - self.ttl_s
        return np.fromiter((i for i, t in shown.items() if t >= cutoff), np.int64)

    async def record(self, user_id: int, item_ids: np.ndarray) -> None:
        now = self._clock()
        shown = self._users.pop(user_id, {})
        cutoff = now - self.ttl_s
        shown = {i: t for i, t in shown.items() if t >= cutoff}
        for i in np.asarray(item_ids, np.int64).tolist():
            shown.pop(i, None)
            shown[i] = now
        if len(shown) > self.max_items:  # dicts keep insertion order: oldest first
            shown = dict(list(shown.items())[-self.max_items :])
        self._users[user_id] = shown
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)

    async def close(self) -> None:
        self._users.clear()


def redis_from_url(url: str, cluster: bool, timeout_s: float) -> Any:
    """A ``redis.asyncio`` client of ``url``: a ``RedisCluster`` when ``cluster``."""
    import redis.asyncio as redis

    if cluster:
        return redis.RedisCluster.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def user_key(prefix: str, user_id: int) -> str:
    """``<prefix>:{<user id>}``: the braces are a Redis Cluster hash tag, so every
    key of one user (shown-history, cached answers of each version) hashes to the
    slot of the user id alone."""
    return f"{prefix}:{{{user_id}}}"


class RedisHistory:
    """Redis store (``redis.asyncio``): one round trip per read and per write."""

    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_items: int,
        prefix: str,
        timeout_s: float = 0.05,
        clock: Callable[[], float] = time.time,
        cluster: bool = False,
    ) -> None:
        """``clock``: wall-clock seconds, shared by every replica (the scores)."""
        self.ttl_s, self.max_items, self.prefix = ttl_s, max_items, prefix
        self._clock = clock
        self._redis = redis_from_url(url, cluster, timeout_s)

    def _key(self, user_id: int) -> str:
        return user_key(self.prefix, user_id)

    async def recent(self, user_id: int) -> np.ndarray:
        members = await self._redis.zrangebyscore(
            self._key(user_id), self._clock() - self.ttl_s, "+inf"
        )
        return np.asarray([int(m) for m in members], np.int64)

    async def record(self, user_id: int, item_ids: np.ndarray) -> None:
        if len(item_ids) == 0:
            return
        now = self._clock()
        key = self._key(user_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {str(i): now for i in np.asarray(item_ids, np.int64).tolist()})
            pipe.zremrangebyscore(key, "-inf", now - self.ttl_s)
            pipe.zremrangebyrank(key, 0, -(self.max_items + 1))
            pipe.expire(key, max(1, int(self.ttl_s)))
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


def open_history(config: HistoryConfig) -> ShownHistory:
    if config.store == "redis":
        return RedisHistory(
            config.redis_url,
            config.ttl_s,
            config.max_items,
            config.key_prefix,
            config.timeout_s,
            cluster=config.redis_cluster,
        )
    return MemoryHistory(config.ttl_s, config.max_items, config.max_users)
