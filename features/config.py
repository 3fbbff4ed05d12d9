"""The online store the build materializes into and the ranker reads from."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from sieve.config import Frozen


class SqliteStoreConfig(Frozen):
    """Feast's embedded SQLite online store (the default)."""

    type: Literal["sqlite"] = "sqlite"
    path: str = "online_store.db"
    """SQLite file, relative to the artifact set's feature repo."""


class RedisStoreConfig(Frozen):
    """Feast's Redis online store (production)."""

    type: Literal["redis"] = "redis"
    connection_string: str = "127.0.0.1:6379"
    """``host:port[,db=N,password=...]`` in Feast's own format; for a cluster, any
    of its nodes as ``host:port,host:port[,password=...]`` (the rest are found)."""
    redis_type: Literal["redis", "redis_cluster"] = "redis"
    """``redis_cluster``: Feast materializes into a Redis Cluster and the ranker's
    reader sends each node its keys' reads at once (``features/reader.py``)."""


OnlineStoreConfig = Annotated[SqliteStoreConfig | RedisStoreConfig, Field(discriminator="type")]
