"""A real local Redis Cluster (three masters, made with ``redis-cli --cluster
create``): Feast materializes into it, our reader reads it equal to Feast's SDK,
and the shown-history and response cache keep one user's keys in one slot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from features.config import RedisStoreConfig
from features.definitions import ITEM_VIEW, USER_VIEW
from features.materialize import materialize_into
from features.reader import RedisClusterReader, open_reader
from ranker.history import RedisHistory, user_key
from ranker.response_cache import CachedAnswer, RedisResponseCache
from sieve import artifacts
from sieve.local_redis import local_redis_cluster
from tests.integration.test_feature_reader import _compare, _ids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with local_redis_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c.nodes


@pytest.fixture(scope="module")
def cluster_repo(
    artifact_set: artifacts.ArtifactSet,
    cluster: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """The session set's feature tables, applied and materialized by Feast into the cluster."""
    repo = tmp_path_factory.mktemp("cluster_repo") / "repo"
    materialize_into(
        artifact_set.verified("feature_store").parent,
        repo,
        artifact_set.manifest.feature_schema.project,
        RedisStoreConfig(connection_string=",".join(cluster[:1]), redis_type="redis_cluster"),
    )
    return repo


async def test_reader_equals_feast_on_the_cluster(cluster_repo: Path, cluster: list[str]) -> None:
    reader = open_reader(cluster_repo)
    assert isinstance(reader, RedisClusterReader)
    await reader.start()
    try:
        for view, n in ((USER_VIEW, 200), (ITEM_VIEW, 1000)):
            await _compare(reader, cluster_repo, view, _ids(cluster_repo, view, n, seed=3))
        # Feast's keys spread over every master: a read really went to all three
        for node in cluster:
            host, port = node.split(":")
            assert redis.Redis(host=host, port=int(port)).dbsize() > 1000, node
        # the library's path (taken on MOVED/ASK or a node gone) reads the same bytes
        ids = _ids(cluster_repo, ITEM_VIEW, 300, seed=4)
        keys = [k + reader.project.encode() for k in reader.entity_keys(ITEM_VIEW.join_key, ids)]
        fields = [b"_ts:" + ITEM_VIEW.name.encode()]
        assert await reader._hmget_many(keys, fields) == await reader._through_library(keys, fields)
    finally:
        await reader.close()


async def test_history_and_response_cache_keep_a_users_keys_in_one_slot(
    cluster: list[str],
) -> None:
    url = f"redis://{cluster[0]}/0"
    history = RedisHistory(url, 3600.0, 100, "sieve:shown", timeout_s=1.0, cluster=True)
    cache = RedisResponseCache(url, "sieve:resp", 600.0, 1.0, cluster=True)
    answer = CachedAnswer(
        ids=np.array([5, 6, 7], np.int64),
        final=np.array([0.3, 0.2, 0.1], np.float32),
        candidate=np.zeros(3, np.float32),
        model=np.zeros(3, np.float32),
        ranks=np.arange(3, dtype=np.int32),
    )
    try:
        for user in (1, 42, 99, 12345):
            await history.record(user, np.array([10, 20, 30], np.int64))
            assert sorted((await history.recent(user)).tolist()) == [10, 20, 30]
            await cache.put("v1", user, answer)
            got = await cache.get("v1", user)
            assert got is not None and got.ids.tolist() == [5, 6, 7]
        client = redis.RedisCluster.from_url(url)
        slots = {client.keyslot(user_key("sieve:shown", 42)), client.keyslot("sieve:resp:v1:{42}")}
        assert slots == {client.keyslot("42")}
        assert client.exists("sieve:resp:v1:{42}") and client.exists("sieve:shown:{42}")
        # users spread over the masters, each whole on one
        owners = {client.get_node_from_key(user_key("x", u)).name for u in range(1, 40)}
        assert len(owners) == 3
    finally:
        await history.close()
        await cache.close()
