"""Our online reader against Feast's own get_online_features, value for value."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytest_asyncio

from features.config import RedisStoreConfig
from features.definitions import FEATURE_SERVICE, ITEM_VIEW, USER_VIEW, ViewSpec
from features.item_table import ReadingChild, load_item_table
from features.materialize import materialize_into
from features.reader import OnlineReader, RedisReader, SqliteReader, open_reader
from sieve import artifacts


@pytest.fixture(scope="session")
def sqlite_repo(artifact_set: artifacts.ArtifactSet) -> Path:
    return artifact_set.verified("feature_store").parent


@pytest.fixture(scope="session")
def redis_repo(
    artifact_set: artifacts.ArtifactSet, redis_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The same feature tables, applied and materialized into the real Redis."""
    repo = tmp_path_factory.mktemp("redis") / "repo"
    materialize_into(
        artifact_set.verified("feature_store").parent,
        repo,
        artifact_set.manifest.feature_schema.project,
        RedisStoreConfig(connection_string=redis_server),
    )
    return repo


def _ids(repo: Path, view: ViewSpec, n: int, seed: int) -> np.ndarray:
    table = pd.read_parquet(repo / "data" / f"{view.name}.parquet", columns=[view.join_key])
    known = np.random.default_rng(seed).choice(table[view.join_key].to_numpy(), n, replace=False)
    return np.concatenate([known, [10**9 + 7]])  # and one id Feast never saw


def _feast_values(repo: Path, view: ViewSpec, ids: np.ndarray) -> dict[str, list]:
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo))
    refs = [f"{view.name}:{f.name}" for f in view.features]
    return store.get_online_features(
        features=refs, entity_rows=[{view.join_key: int(i)} for i in ids]
    ).to_dict()


async def _compare(reader: OnlineReader, repo: Path, view: ViewSpec, ids: np.ndarray) -> None:
    ours = await reader.read(view, ids)
    theirs = _feast_values(repo, view, ids)
    assert ours.found.tolist() == [v is not None for v in theirs[view.features[0].name]]
    assert ours.found[:-1].all() and not ours.found[-1]
    for f in view.features:
        for row, value in enumerate(theirs[f.name]):
            if value is None:
                continue
            got = ours.columns[f.name][row]
            if f.kind in ("float", "float_list"):
                want = np.asarray(value, dtype=np.float32)
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, want, err_msg=f"{f.name} of id {ids[row]}")
            else:
                np.testing.assert_array_equal(
                    np.asarray(got, np.int64),
                    np.asarray(value, np.int64),
                    err_msg=f"{f.name} of id {ids[row]}",
                )


@pytest_asyncio.fixture(loop_scope="session")
async def sqlite_reader(sqlite_repo: Path):  # type: ignore[no-untyped-def]
    reader = open_reader(sqlite_repo)
    assert isinstance(reader, SqliteReader)
    await reader.start()
    yield reader
    await reader.close()


@pytest_asyncio.fixture(loop_scope="session")
async def redis_reader(redis_repo: Path):  # type: ignore[no-untyped-def]
    reader = open_reader(redis_repo)
    assert isinstance(reader, RedisReader)
    await reader.start()
    yield reader
    await reader.close()


@pytest.mark.parametrize("view", [USER_VIEW, ITEM_VIEW], ids=lambda v: v.name)
async def test_sqlite_reader_equals_feast(sqlite_reader, sqlite_repo: Path, view: ViewSpec) -> None:  # type: ignore[no-untyped-def]
    await _compare(sqlite_reader, sqlite_repo, view, _ids(sqlite_repo, view, 60, seed=1))


@pytest.mark.parametrize("view", [USER_VIEW, ITEM_VIEW], ids=lambda v: v.name)
async def test_redis_reader_equals_feast(redis_reader, redis_repo: Path, view: ViewSpec) -> None:  # type: ignore[no-untyped-def]
    await _compare(redis_reader, redis_repo, view, _ids(redis_repo, view, 60, seed=2))


async def test_stores_agree_with_the_offline_table(
    sqlite_reader, redis_reader, sqlite_repo
) -> None:  # type: ignore[no-untyped-def]
    table = pd.read_parquet(sqlite_repo / "data" / "user_features.parquet")
    row = table.iloc[17]
    ids = np.array([row["user_id"]])
    for reader in (sqlite_reader, redis_reader):
        got = await reader.read(USER_VIEW, ids)
        np.testing.assert_array_equal(got.columns["user_vector"][0], row["user_vector"])
        np.testing.assert_array_equal(got.columns["seen_item_ids"][0], row["seen_item_ids"])
        assert got.columns["rating_count"][0] == row["rating_count"]


def test_feature_service_is_registered(sqlite_repo: Path) -> None:
    from feast import FeatureStore

    service = FeatureStore(repo_path=str(sqlite_repo)).get_feature_service(FEATURE_SERVICE)
    assert sorted(p.name for p in service.feature_view_projections) == sorted(
        [USER_VIEW.name, ITEM_VIEW.name]
    )


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_item_table_read_by_a_child_equals_the_one_read_here(  # type: ignore[no-untyped-def]
    store: str, sqlite_reader, redis_reader, sqlite_repo: Path, redis_repo: Path
) -> None:
    reader, repo = (sqlite_reader, sqlite_repo) if store == "sqlite" else (redis_reader, redis_repo)
    ids = pd.read_parquet(repo / "data" / "item_features.parquet", columns=["item_id"])
    ids = np.concatenate([ids["item_id"].to_numpy(np.int64), [10**9 + 7]])  # one unknown
    here = await load_item_table(reader, ids, repo, process_min_items=len(ids) + 1)
    handoffs = set(Path(tempfile.gettempdir()).glob("sieve-items-*"))
    child = await load_item_table(reader, ids, repo, process_min_items=len(ids))
    assert set(Path(tempfile.gettempdir()).glob("sieve-items-*")) == handoffs  # removed
    assert len(here) == len(ids) - 1 > 9000
    np.testing.assert_array_equal(child.ids, here.ids)
    names = sorted(f.name for f in ITEM_VIEW.features)
    assert sorted(child.columns) == sorted(here.columns) == names
    for name, col in here.columns.items():
        assert child.columns[name].dtype == col.dtype
        np.testing.assert_array_equal(child.columns[name], col, err_msg=name)


async def test_reading_children_are_forked_from_the_fork_server(  # type: ignore[no-untyped-def]
    redis_reader, redis_repo: Path
) -> None:
    """A ranker's reads of item tables run in children forked from the fork server
    it started while small, not from the ranker itself, one child per read."""
    ids = pd.read_parquet(redis_repo / "data" / "item_features.parquet", columns=["item_id"])
    ids = ids["item_id"].to_numpy(np.int64)
    here = await load_item_table(redis_reader, ids, redis_repo, process_min_items=len(ids) + 1)
    child = ReadingChild()
    await asyncio.to_thread(child.start)
    tables, children = [], []
    for _ in range(2):
        tables.append(await load_item_table(redis_reader, ids, redis_repo, 0, child))
        assert child.last_child is not None
        children.append(child.last_child)
    (pid1, parent1), (pid2, parent2) = children
    assert pid1 != pid2 and parent1 == parent2 != os.getpid()
    for table in tables:
        np.testing.assert_array_equal(table.ids, here.ids)
        for name, col in here.columns.items():
            np.testing.assert_array_equal(table.columns[name], col, err_msg=name)


async def test_item_table_child_reports_the_store_error(tmp_path: Path, redis_repo: Path) -> None:
    """A child that cannot reach the store fails the load (the caller keeps its
    last good table), with Redis's own error, not a hang or a silent empty table."""
    import redis.exceptions
    import yaml

    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = yaml.safe_load((redis_repo / "feature_store.yaml").read_text())
    cfg["online_store"]["connection_string"] = f"127.0.0.1:{_closed_port()}"
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(cfg))
    reader = open_reader(repo)
    with pytest.raises(redis.exceptions.ConnectionError):
        await load_item_table(reader, np.arange(1, 10, dtype=np.int64), repo, process_min_items=0)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_prepared_reader_needs_no_feast_call_to_read(redis_repo: Path) -> None:
    """``prepare`` builds every view's key encoder up front (the ranker calls it at
    load), so the first request does not import Feast (seconds of CPU)."""
    reader = open_reader(redis_repo)
    await reader.start()
    try:
        reader.prepare([USER_VIEW, ITEM_VIEW])
        encoders = dict(reader._keys)
        assert sorted(encoders) == sorted([USER_VIEW.join_key, ITEM_VIEW.join_key])
        await reader.read(USER_VIEW, np.array([1, 2], np.int64))
        assert reader._keys == encoders  # the same objects: nothing built on the read
    finally:
        await reader.close()
