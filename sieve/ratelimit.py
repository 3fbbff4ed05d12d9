"""Per-caller rate limits: a token bucket per caller identity (``sieve/auth.py``:
the API key's name, the JWT's subject, the client certificate's CN, else the
peer's address), checked before any work of the call.

With Redis configured the buckets are shared by every replica: one ``EVALSHA``
of a Lua script per call (read, refill, take, write, expire: one round trip,
atomic), timed by Redis's own clock so replicas on skewed hosts agree. Without
it, each process keeps its own buckets. A caller over its limit gets
RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` in the status details (the
``grpc-status-details-bin`` trailer; ``grpcio-status`` reads it), and costs the
server one dictionary look-up or one Redis call, so it cannot slow another
caller's answers. A Redis that fails does not fail the call: the limit is
skipped (logged once a minute) rather than the service.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from pydantic import Field

from sieve.auth import Caller, Refused
from sieve.config import Frozen

log = logging.getLogger(__name__)


class CallerLimit(Frozen):
    rate_per_s: float = Field(gt=0.0)
    burst: int = Field(ge=1)


class RateLimitConfig(Frozen):
    """``[ranker.rate_limit]`` / ``[candidate.rate_limit]``: off by default."""

    enabled: bool = False
    rate_per_s: float = Field(100.0, gt=0.0)
    """Calls per second each caller may make, sustained."""
    burst: int = Field(200, ge=1)
    """Calls a caller may make at once after a quiet spell (the bucket's size)."""
    callers: dict[str, CallerLimit] = {}
    """Per-identity overrides, e.g. ``"key:batch-jobs" = {rate_per_s = 5, burst = 10}``."""
    store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/3"
    redis_cluster: bool = False
    key_prefix: str = Field("sieve:rl", min_length=1)
    timeout_s: float = Field(0.02, gt=0.0, le=5.0)


LUA = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local got = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(got[1]) or burst
local ts = tonumber(got[2]) or t
tokens = math.min(burst, tokens + math.max(0, t - ts) * rate)
local ok = 0
if tokens >= 1 then tokens = tokens - 1; ok = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(t))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {ok, tostring((1 - tokens) / rate)}
"""
"""KEYS[1]: the caller's bucket; ARGV: rate per second, burst. Returns [1, _] when
a token was taken, else [0, seconds until one is there]."""


@dataclass
class _Bucket:
    tokens: float
    ts: float


class RateLimiter:
    """The ``Check`` of ``GuardInterceptor`` that applies ``RateLimitConfig``."""

    def __init__(self, config: RateLimitConfig, clock: Any = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._redis: Any = None
        self._script: Any = None
        self._warned = 0.0

    def limits(self, identity: str) -> tuple[float, int]:
        own = self.config.callers.get(identity)
        if own is not None:
            return own.rate_per_s, own.burst
        return self.config.rate_per_s, self.config.burst

    async def __call__(self, caller: Caller, method: str) -> None:
        rate, burst = self.limits(caller.identity)
        if self.config.store == "redis":
            wait = await self._take_redis(caller.identity, rate, burst)
        else:
            wait = self._take_memory(caller.identity, rate, burst)
        if wait > 0:
            raise over_limit(caller.identity, method, rate, burst, wait)

    def _take_memory(self, identity: str, rate: float, burst: int) -> float:
        now = self._clock()
        b = self._buckets.get(identity)
        if b is None:
            if len(self._buckets) > 100_000:  # forget idle callers rather than grow
                self._buckets.clear()
            b = self._buckets[identity] = _Bucket(float(burst), now)
        b.tokens = min(float(burst), b.tokens + (now - b.ts) * rate)
        b.ts = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / rate

    async def _take_redis(self, identity: str, rate: float, burst: int) -> float:
        if self._redis is None:
            self._redis = _client(self.config)
            self._script = self._redis.register_script(LUA)
        key = f"{self.config.key_prefix}:{{{identity}}}"
        try:
            ok, wait = await self._script(keys=[key], args=[rate, burst])
        except Exception as e:  # noqa: BLE001 - a limiter must not take the service down
            now = time.monotonic()
            if now - self._warned > 60:
                self._warned = now
                log.warning("rate limit store failed (%s: %s); not limiting", type(e).__name__, e)
            return 0.0
        return 0.0 if int(ok) == 1 else float(wait)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def _client(config: RateLimitConfig) -> Any:
    import redis.asyncio as redis

    t = config.timeout_s
    if config.redis_cluster:
        return redis.RedisCluster.from_url(
            config.redis_url, socket_timeout=t, socket_connect_timeout=t
        )
    return redis.Redis.from_url(config.redis_url, socket_timeout=t, socket_connect_timeout=t)


def over_limit(identity: str, method: str, rate: float, burst: int, wait_s: float) -> Refused:
    """RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` of ``wait_s`` in its details."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    wait_s = max(wait_s, 0.001)
    message = (
        f"caller {identity} is over its rate limit for {method} ({rate:g}/s, burst {burst}); "
        f"retry in {wait_s * 1e3:.0f} ms"
    )
    detail = any_pb2.Any()
    seconds = int(wait_s)
    detail.Pack(
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((wait_s - seconds) * 1e9))
        )
    )
    status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    )
    refused = Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    refused.trailing_metadata = status.trailing_metadata  # type: ignore[attr-defined]
    return refused
