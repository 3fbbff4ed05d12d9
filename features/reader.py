"""The serving path's online feature reader: what Feast wrote, read fast.

Feast owns the definitions and the materialization; ``FeatureStore.
get_online_features`` is the reference reader (tens of ms for 1000 items). These
readers read the same bytes from the same tables and hashes, with keys computed
once, and decode straight into numpy. ``tests/integration/test_feature_reader.py``
holds them equal to Feast's SDK, value for value, on SQLite and on Redis.

Layouts (Feast 0.67, read from ``feast/infra/online_stores/{sqlite,redis}.py``):
- SQLite: table ``{project}_{view}`` with rows (entity_key, feature_name, value),
  ``value`` a serialized ``ValueProto``.
- Redis: one hash per entity at ``serialize_entity_key(key) + project``; fields
  are ``mmh3("{view}:{feature}")`` as 4 little-endian bytes plus ``_ts:{view}``.
  A Redis Cluster (``redis_type: redis_cluster``) holds the same hashes, spread
  over its masters by the CRC16 slot of the key (no hash tag).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import sqlite3
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mmh3
import numpy as np
import yaml

from features.definitions import FeatureSpec, ViewSpec
from sieve.errors import ArtifactError


@dataclass(frozen=True)
class FeatureFrame:
    """Features of ``len(ids)`` entities of one view.

    Attributes:
        ids: int64 [n], the requested entity ids.
        found: bool [n], False where the store holds no row for the id.
        columns: feature name -> values. ``float``: float32 [n]; ``int64``: int64 [n];
            ``float_list``: float32 [n, dim]; ``int64_list``: a list of n int64 arrays.
            A missing float value (entity not found, or a null Feast stored, as it
            does for NaN) is NaN, so the scorer's default applies to it; missing
            ints are 0 and missing lists empty.
    """

    ids: np.ndarray
    found: np.ndarray
    columns: dict[str, np.ndarray | list[np.ndarray]]

    def array(self, name: str) -> np.ndarray:
        """A scalar or fixed-size list column as one array."""
        col = self.columns[name]
        if not isinstance(col, np.ndarray):
            raise TypeError(f"feature {name!r} is a variable-length list; use lists()")
        return col

    def lists(self, name: str) -> list[np.ndarray]:
        """A variable-length list column, one array per entity."""
        col = self.columns[name]
        if isinstance(col, np.ndarray):
            raise TypeError(f"feature {name!r} is not a variable-length list; use array()")
        return col


@functools.cache
def _value_proto() -> Any:
    from feast.protos.feast.types.Value_pb2 import Value

    return Value


@functools.cache
def _float_list_header(dim: int) -> bytes:
    """The bytes before the packed floats in a serialized ``Value`` holding a
    ``float_list_val`` of ``dim`` values (the encoding is canonical: one field)."""
    from feast.protos.feast.types.Value_pb2 import FloatList

    full = _value_proto()(float_list_val=FloatList(val=[0.0] * dim)).SerializeToString()
    return full[: len(full) - 4 * dim]


def _float_lists(raw: Sequence[bytes | None], dim: int, name: str) -> np.ndarray:
    out = np.full((len(raw), dim), np.nan, dtype=np.float32)
    header = _float_list_header(dim)
    size = len(header) + 4 * dim
    for i, b in enumerate(raw):
        if not b:
            continue
        if len(b) == size and b.startswith(header):
            # Fast path: the packed little-endian floats are the message's tail.
            out[i] = np.frombuffer(b, dtype="<f4", offset=len(header))
            continue
        vals = _value_proto().FromString(b).float_list_val.val
        if len(vals) == 0:
            continue
        if len(vals) != dim:
            raise ArtifactError(f"feature {name!r} has {len(vals)} values, schema says {dim}")
        out[i] = vals
    return out


def decode_column(raw: Sequence[bytes | None], spec: FeatureSpec) -> np.ndarray | list[np.ndarray]:
    """Serialized ``ValueProto``s of one feature -> a numpy column (see FeatureFrame).

    A missing value (None, or a proto with no field set) decodes to NaN for float
    kinds, 0 for int64 and an empty array for int64 lists.

    Raises:
        ArtifactError: a fixed-size list has the wrong length.
    """
    value_cls = _value_proto()
    n = len(raw)
    if spec.kind == "int64_list":
        out_lists: list[np.ndarray] = []
        for b in raw:
            v = value_cls.FromString(b) if b else None
            out_lists.append(
                np.asarray(v.int64_list_val.val, dtype=np.int64)
                if v is not None
                else np.empty(0, np.int64)
            )
        return out_lists
    if spec.kind == "float_list":
        return _float_lists(raw, spec.dim, spec.name)
    if spec.kind == "float":
        floats = np.full(n, np.nan, dtype=np.float32)
        for i, b in enumerate(raw):
            if b:
                v = value_cls.FromString(b)
                if v.WhichOneof("val") == "float_val":
                    floats[i] = v.float_val
        return floats
    ints = np.zeros(n, dtype=np.int64)
    for i, b in enumerate(raw):
        if b:
            ints[i] = value_cls.FromString(b).int64_val
    return ints


class EntityKeys:
    """Feast's serialized entity keys for one Int64 join key, many ids at once.

    For a single Int64 key the serialization is a constant prefix followed by the
    id as a little-endian int64. That layout is checked against Feast's own
    ``serialize_entity_key`` at construction; if a Feast release changes it, this
    falls back to calling Feast per id.
    """

    def __init__(self, join_key: str, version: int) -> None:
        self.join_key = join_key
        self.version = version
        probe = entity_key_bytes(join_key, 0, version)
        prefix = probe[:-8]
        fits = all(
            entity_key_bytes(join_key, i, version) == prefix + struct.pack("<q", i)
            for i in (0, 1, -1, 2**40 + 3, 2**63 - 1)
        )
        self._prefix: bytes | None = prefix if fits else None

    def __call__(self, ids: np.ndarray) -> list[bytes]:
        if self._prefix is None:
            return [entity_key_bytes(self.join_key, int(i), self.version) for i in ids]
        raw = np.ascontiguousarray(ids, dtype="<i8").tobytes()
        p = self._prefix
        return [p + raw[j : j + 8] for j in range(0, len(raw), 8)]


def entity_key_bytes(join_key: str, entity_id: int, version: int) -> bytes:
    """Feast's serialized entity key for one Int64 join key."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey

    value_cls = _value_proto()
    key = EntityKey(join_keys=[join_key], entity_values=[value_cls(int64_val=int(entity_id))])
    return serialize_entity_key(key, entity_key_serialization_version=version)


def feature_field(view: str, feature: str) -> bytes:
    """Feast's Redis hash field for a feature: murmur3_32 of ``view:feature``, LE."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


class OnlineReader(abc.ABC):
    """Reads one view's features for a batch of entity ids."""

    def __init__(self, project: str, key_version: int) -> None:
        self.project = project
        self.key_version = key_version
        self._keys: dict[str, EntityKeys] = {}

    def prepare(self, views: Sequence[ViewSpec]) -> None:
        """Build the entity-key encoders of ``views`` now. The first one imports
        Feast to check the key layout (seconds of CPU): a reader prepared at load
        does not make the first request after start pay for it. Blocking: call
        it from a worker thread."""
        for view in views:
            self.entity_keys(view.join_key, np.empty(0, np.int64))

    def entity_keys(self, join_key: str, ids: np.ndarray) -> list[bytes]:
        """Serialized Feast entity keys of ``ids`` under ``join_key``."""
        enc = self._keys.get(join_key)
        if enc is None:
            enc = self._keys[join_key] = EntityKeys(join_key, self.key_version)
        return enc(ids)

    @abc.abstractmethod
    async def start(self) -> None:
        """Open connections; called once before ``read``."""

    @abc.abstractmethod
    async def read(self, view: ViewSpec, ids: np.ndarray) -> FeatureFrame:
        """Features of ``ids`` (int64 [n]) in request order."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    def _frame(
        self, view: ViewSpec, ids: np.ndarray, rows: list[dict[str, bytes | None] | None]
    ) -> FeatureFrame:
        found = np.array([r is not None for r in rows], dtype=bool)
        columns = {
            f.name: decode_column([r.get(f.name) if r else None for r in rows], f)
            for f in view.features
        }
        return FeatureFrame(ids=np.asarray(ids, dtype=np.int64), found=found, columns=columns)


class SqliteReader(OnlineReader):
    """Feast's SQLite online store, read with one SELECT per batch."""

    def __init__(self, project: str, key_version: int, path: Path) -> None:
        super().__init__(project, key_version)
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        if not self.path.is_file():
            raise ArtifactError(f"online store {self.path} does not exist (run `sieve build`)")
        # Read-only URI: the serving path never writes Feast's tables.
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    async def read(self, view: ViewSpec, ids: np.ndarray) -> FeatureFrame:
        if self._conn is None:
            raise RuntimeError("SqliteReader.read before start()")
        keys = self.entity_keys(view.join_key, ids)
        by_key: dict[bytes, dict[str, bytes | None]] = {}
        table = f'"{self.project}_{view.name}"'
        for lo in range(0, len(keys), 900):  # stay under SQLite's bound-parameter limit
            chunk = keys[lo : lo + 900]
            cur = self._conn.execute(
                f"SELECT entity_key, feature_name, value FROM {table} "
                f"WHERE entity_key IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for key, name, value in cur:
                row = by_key.get(key)
                if row is None:
                    row = by_key[key] = {}
                row[name] = value
        return self._frame(view, ids, [by_key.get(k) for k in keys])

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class RedisReader(OnlineReader):
    """Feast's Redis online store, read with one pipelined HMGET per entity."""

    def __init__(
        self,
        project: str,
        key_version: int,
        connection_string: str,
        max_connections: int = 64,
        timeout_s: float = 1.0,
    ) -> None:
        """``max_connections`` bounds the pool (a bulkhead: a slow Redis holds at
        most that many; a read that finds none free waits up to ``timeout_s``);
        ``timeout_s`` is also the socket's connect and read timeout."""
        super().__init__(project, key_version)
        self.connection_string = connection_string
        self.max_connections, self.timeout_s = max_connections, timeout_s
        self._client: object | None = None

    async def start(self) -> None:
        import redis.asyncio as aioredis

        host_port, *options = self.connection_string.split(",")
        host, _, port = host_port.partition(":")
        kwargs: dict[str, object] = {}
        for opt in options:
            k, _, v = opt.partition("=")
            kwargs[k.strip()] = int(v) if k.strip() == "db" else v
        pool = aioredis.BlockingConnectionPool(
            host=host,
            port=int(port or 6379),
            max_connections=self.max_connections,
            timeout=self.timeout_s,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            **kwargs,  # type: ignore[arg-type]
        )
        self._client = aioredis.Redis(connection_pool=pool)

    async def read(self, view: ViewSpec, ids: np.ndarray) -> FeatureFrame:
        if self._client is None:
            raise RuntimeError("RedisReader.read before start()")
        project = self.project.encode()
        fields = [feature_field(view.name, f.name) for f in view.features]
        fields.append(f"_ts:{view.name}".encode())
        keys = [k + project for k in self.entity_keys(view.join_key, ids)]
        replies = await self._hmget_many(keys, fields)
        rows: list[dict[str, bytes | None] | None] = []
        for reply in replies:
            if reply[-1] is None:  # no timestamp: Feast never wrote this entity
                rows.append(None)
            else:
                rows.append({f.name: v for f, v in zip(view.features, reply, strict=False)})
        return self._frame(view, ids, rows)

    async def _hmget_many(self, keys: list[bytes], fields: list[bytes]) -> list[list[bytes | None]]:
        """One pipelined HMGET per key, in one write.

        The RESP encoding of the constant part (command and fields) is built once
        per call instead of per key by redis-py's pure-Python ``pack_command``;
        redis-py's connection and reply parser (hiredis when installed) do the rest.
        """
        pool = self._client.connection_pool  # type: ignore[union-attr]
        head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(fields) + 2)  # HMGET, key, fields
        tail = b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields)
        payload = b"".join(b"%s$%d\r\n%s\r\n%s" % (head, len(k), k, tail) for k in keys)
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(payload, check_health=True)
            return [await conn.read_response() for _ in keys]
        except BaseException:
            # A half-read pipeline leaves the connection unusable: drop it.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()  # type: ignore[attr-defined]
            self._client = None


class RedisClusterReader(RedisReader):
    """Feast's Redis online store on a Redis Cluster (``redis_type: redis_cluster``).

    Feast's keys carry no hash tag, so one read's entities spread over every
    master: the keys are grouped by the node that owns their slot (the client's
    slot map) and each node gets its pipelined HMGETs in one write, all nodes at
    once. When the map is stale (a MOVED or ASK answer, a node gone), the read is
    done again through redis-py's cluster pipeline, which follows redirections
    and refreshes the map, so a resharding or a failover costs a slower read, not
    a wrong one.
    """

    async def start(self) -> None:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes, kwargs = [], {}
        for part in self.connection_string.split(","):
            k, eq, v = part.partition("=")
            if eq:
                kwargs[k.strip()] = v.strip()
            else:
                host, _, port = part.strip().partition(":")
                nodes.append(ClusterNode(host, int(port or 6379)))
        client = RedisCluster(
            startup_nodes=nodes,
            max_connections=self.max_connections,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            require_full_coverage=False,
            **kwargs,  # type: ignore[arg-type]
        )
        await client.initialize()
        self._client = client

    async def _hmget_many(self, keys: list[bytes], fields: list[bytes]) -> list[list[bytes | None]]:
        from redis.exceptions import RedisClusterException, RedisError

        client: Any = self._client
        by_node: dict[Any, list[int]] = {}
        try:
            for i, key in enumerate(keys):
                by_node.setdefault(client.get_node_from_key(key), []).append(i)
        except RedisClusterException:  # a slot no node holds (yet): the library's way
            return await self._through_library(keys, fields)
        head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(fields) + 2)
        tail = b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields)
        out: list[list[bytes | None]] = [[] for _ in keys]

        async def on_node(node: Any, rows: list[int]) -> None:
            payload = b"".join(
                b"%s$%d\r\n%s\r\n%s" % (head, len(keys[i]), keys[i], tail) for i in rows
            )
            conn = node.acquire_connection()
            try:
                await node.disconnect_if_needed(conn)
                await conn.send_packed_command(payload, check_health=False)
                for i in rows:
                    out[i] = await conn.read_response()
            except BaseException:
                await conn.disconnect()  # a half-read pipeline: drop the connection
                raise
            finally:
                node.release(conn)

        try:
            await asyncio.gather(*(on_node(n, rows) for n, rows in by_node.items()))
        except (RedisError, OSError):
            # MOVED/ASK, a node gone or unreachable: redis-py follows the
            # redirections and refreshes its slot map (or raises, and the ranker
            # takes its rung)
            return await self._through_library(keys, fields)
        return out

    async def _through_library(
        self, keys: list[bytes], fields: list[bytes]
    ) -> list[list[bytes | None]]:
        client: Any = self._client
        pipe = client.pipeline()
        for key in keys:
            pipe.hmget(key, fields)
        return list(await pipe.execute())


def open_reader(repo_dir: Path, max_connections: int = 64, timeout_s: float = 1.0) -> OnlineReader:
    """The reader for the online store named in ``repo_dir/feature_store.yaml``
    (``max_connections`` and ``timeout_s``: see ``RedisReader``).

    Raises:
        ArtifactError: the file is missing or names a store we do not read.
    """
    path = Path(repo_dir) / "feature_store.yaml"
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    try:
        cfg = yaml.safe_load(path.read_text())
        project = cfg["project"]
        online = cfg.get("online_store", {"type": "sqlite", "path": "online_store.db"})
        version = int(cfg.get("entity_key_serialization_version", 3))
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path} is not a valid feature_store.yaml: {e}") from e
    kind = online.get("type", "sqlite") if isinstance(online, dict) else online
    if kind == "sqlite":
        db = Path(online.get("path", "online_store.db"))
        return SqliteReader(project, version, db if db.is_absolute() else Path(repo_dir) / db)
    if kind == "redis":
        cls = RedisClusterReader if online.get("redis_type") == "redis_cluster" else RedisReader
        return cls(
            project,
            version,
            online.get("connection_string", "localhost:6379"),
            max_connections,
            timeout_s,
        )
    raise ArtifactError(f"{path}: online store type {kind!r} is not supported (sqlite, redis)")


async def read_all(
    reader: OnlineReader, view: ViewSpec, ids: np.ndarray, batch: int = 500
) -> FeatureFrame:
    """Read many ids in batches (loads of the whole item table). 500 ids a batch
    holds the event loop for a few ms at a time, so a load beside live requests
    (a reload, a new materialization) does not stall them."""
    frames = [await reader.read(view, ids[lo : lo + batch]) for lo in range(0, len(ids), batch)]
    columns: dict[str, np.ndarray | list[np.ndarray]] = {}
    for f in view.features:
        parts = [fr.columns[f.name] for fr in frames]
        if f.kind == "int64_list":
            columns[f.name] = [a for p in parts for a in p]  # type: ignore[union-attr]
        else:
            columns[f.name] = np.concatenate(parts) if parts else np.empty(0)  # type: ignore[arg-type]
    found = np.concatenate([fr.found for fr in frames]) if frames else np.empty(0, bool)
    return FeatureFrame(ids=np.asarray(ids, np.int64), found=found, columns=columns)
