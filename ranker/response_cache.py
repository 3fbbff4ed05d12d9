"""Each user's last full-quality answer, served when the request path cannot make a
new one (the ``cached_response`` rung of the degradation ladder).

Two stores with one interface, like the shown-history: in process (the embedded
default) and Redis (shared by replicas). Keys carry the artifact version, so a new
set never serves an answer of the old one; entries expire after ``ttl_s``.

Redis layout: one string per user and version, ``<prefix>:<version>:{<user_id>}``
(the user id a hash tag: ``ranker.history.user_key``),
holding the packed arrays of ``CachedAnswer`` (``encode``), with a TTL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ranker.config import ResponseCacheConfig
from ranker.history import redis_from_url, user_key
from ranker.resilience import TtlCache

_HEADER = struct.Struct("<I")
_FIELDS = (("ids", np.int64), ("final", np.float32), ("candidate", np.float32),
           ("model", np.float32), ("ranks", np.int32))  # fmt: skip


@dataclass(frozen=True)
class CachedAnswer:
    """An answer's items, best first, as the response carried them."""

    ids: np.ndarray  # int64 [n]
    final: np.ndarray  # float32 [n]
    candidate: np.ndarray  # float32 [n]
    model: np.ndarray  # float32 [n]
    ranks: np.ndarray  # int32 [n]


def encode(answer: CachedAnswer) -> bytes:
    n = len(answer.ids)
    parts = [_HEADER.pack(n)]
    for name, dtype in _FIELDS:
        col = np.ascontiguousarray(getattr(answer, name), dtype)
        if len(col) != n:
            raise ValueError(f"{name} has {len(col)} values for {n} items")
        parts.append(col.tobytes())
    return b"".join(parts)


def decode(raw: bytes) -> CachedAnswer:
    """The inverse of ``encode``.

    Raises:
        ValueError: ``raw`` is not an encoded answer (wrong length).
    """
    if len(raw) < _HEADER.size:
        raise ValueError(f"a cached answer is at least {_HEADER.size} bytes, got {len(raw)}")
    (n,) = _HEADER.unpack_from(raw)
    size = _HEADER.size + n * sum(np.dtype(d).itemsize for _, d in _FIELDS)
    if len(raw) != size:
        raise ValueError(f"a cached answer of {n} items is {size} bytes, got {len(raw)}")
    cols, at = {}, _HEADER.size
    for name, dtype in _FIELDS:
        cols[name] = np.frombuffer(raw, dtype, n, at)
        at += n * np.dtype(dtype).itemsize
    return CachedAnswer(**cols)


class ResponseCache(Protocol):
    async def get(self, version: str, user_id: int) -> CachedAnswer | None: ...

    async def put(self, version: str, user_id: int, answer: CachedAnswer) -> None: ...

    async def close(self) -> None: ...


class MemoryResponseCache:
    def __init__(self, ttl_s: float, max_users: int) -> None:
        self._cache: TtlCache[tuple[str, int], CachedAnswer] = TtlCache(max_users, ttl_s)

    async def get(self, version: str, user_id: int) -> CachedAnswer | None:
        return self._cache.get((version, user_id))

    async def put(self, version: str, user_id: int, answer: CachedAnswer) -> None:
        self._cache.put((version, user_id), answer)

    async def close(self) -> None:
        pass


class RedisResponseCache:
    """Redis store (``redis.asyncio``): one GET per read, one SET (with TTL) per write."""

    def __init__(
        self, url: str, prefix: str, ttl_s: float, timeout_s: float, cluster: bool = False
    ) -> None:
        self.prefix, self.ttl_ms = prefix, max(1, int(ttl_s * 1000))
        self._redis = redis_from_url(url, cluster, timeout_s)

    def _key(self, version: str, user_id: int) -> str:
        return user_key(f"{self.prefix}:{version}", user_id)

    async def get(self, version: str, user_id: int) -> CachedAnswer | None:
        raw = await self._redis.get(self._key(version, user_id))
        return None if raw is None else decode(raw)

    async def put(self, version: str, user_id: int, answer: CachedAnswer) -> None:
        await self._redis.set(self._key(version, user_id), encode(answer), px=self.ttl_ms)

    async def close(self) -> None:
        await self._redis.aclose()


def open_response_cache(config: ResponseCacheConfig) -> ResponseCache | None:
    """The configured store, or None when ``store = "off"``."""
    if config.store == "redis":
        return RedisResponseCache(
            config.redis_url,
            config.key_prefix,
            config.ttl_s,
            config.timeout_s,
            cluster=config.redis_cluster,
        )
    if config.store == "memory":
        return MemoryResponseCache(config.ttl_s, config.max_users)
    return None
