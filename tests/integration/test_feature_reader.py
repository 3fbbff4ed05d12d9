"""Our online reader against Feast's own get_online_features, value for value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytest_asyncio

from features.definitions import FEATURE_SERVICE, ITEM_VIEW, USER_VIEW, ViewSpec
from features.materialize import materialize_into
from features.reader import OnlineReader, RedisReader, SqliteReader, open_reader
from sieve import artifacts
from sieve.config import RedisStoreConfig


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
        artifact_set.manifest["feature_schema"]["project"],
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
