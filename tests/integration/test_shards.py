"""A sharded candidate index on real servers: the ranker's scatter-gather answers
what one whole index answers, a shard down gives partial answers (never a
failure), and a new set goes live only once every shard holds it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio

from candidate.config import CandidateConfig
from candidate.service import create_server as create_candidate
from candidate.sets import load_index
from candidate.shards import reshard, shard_of
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.scatter import merge_top
from ranker.service import create_server as create_ranker
from sieve import artifacts
from sieve.errors import ArtifactError
from tests.conftest import RELAXED, STATELESS, copy_artifacts, until

USERS = (1, 42, 99, 414, 599)


@pytest.fixture(scope="module")
def sharded_root(artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the session's set, resharded into 2 shards and published."""
    root = copy_artifacts(artifacts_root, tmp_path_factory.mktemp("sharded"))
    reshard(root, artifacts.current_version(root), "sharded2", 2)
    artifacts.publish(root, "sharded2")
    return root


def test_reshard_writes_checksummed_shards_that_partition_the_catalog(sharded_root: Path) -> None:
    aset = artifacts.load(sharded_root)
    m = aset.manifest
    assert m.shards is not None and m.shards.count == 2
    ids = aset.read_catalog(["item_id"])["item_id"].to_numpy(np.int64)
    assert sum(m.shards.ntotal) == len(ids) == m.index.ntotal
    assert m.shards.ntotal == tuple(np.bincount(shard_of(ids, 2)).tolist())
    for role in ("index.shard0", "index.shard1", "text_index.shard0", "text_index.shard1"):
        aset.verified(role)  # present, and matching its checksum
    seen: list[np.ndarray] = []
    for i in range(2):
        index, text, count = load_index(CandidateConfig(shard=i), sharded_root, m.version, False)
        assert count == 2 and text is not None
        assert index.index.ntotal == m.shards.ntotal[i] == text.index.ntotal
        assert (shard_of(index.item_ids, 2) == i).all()
        seen.append(index.item_ids)
    assert (np.sort(np.concatenate(seen)) == np.sort(ids)).all()


def test_a_shard_the_set_lacks_is_refused_at_load(sharded_root: Path, artifacts_root: Path) -> None:
    version = artifacts.current_version(sharded_root)
    with pytest.raises(ArtifactError, match="candidate.shard is 2, set sharded2 has 2 shards"):
        load_index(CandidateConfig(shard=2), sharded_root, version, False)
    with pytest.raises(ArtifactError, match="is not sharded"):
        load_index(
            CandidateConfig(shard=0),
            artifacts_root,
            artifacts.current_version(artifacts_root),
            False,
        )


def test_merged_shards_answer_what_the_whole_exact_index_answers(sharded_root: Path) -> None:
    """The set's indexes are exact (Flat) at MovieLens' size: the merge of the two
    shards' top-k is the whole index's top-k, with exclusions and categories."""
    version = artifacts.current_version(sharded_root)
    whole, whole_text, _ = load_index(CandidateConfig(), sharded_root, version, False)
    parts = [load_index(CandidateConfig(shard=i), sharded_root, version, False) for i in (0, 1)]
    rng = np.random.default_rng(0)
    for q in range(10):
        for space, index in (("learned", whole), ("text", whole_text)):
            assert index is not None
            v = rng.standard_normal(index.dim).astype(np.float32)
            v /= np.linalg.norm(v)
            exclude = rng.choice(index.item_ids, 500, replace=False)
            allow = ["Comedy"] if q % 2 else None
            want = index.search(v, 1000, exclude, allow)
            shard_indexes = [p[0] if space == "learned" else p[1] for p in parts]
            got = merge_top(
                [
                    (r.item_ids, r.scores)
                    for r in (s.search(v, 1000, exclude, allow) for s in shard_indexes if s)
                ],
                1000,
            )
            np.testing.assert_allclose(got[1], want.scores, rtol=1e-5)
            # the same items in the same order, up to ties (equal texts score equal)
            differ = np.flatnonzero(got[0] != want.item_ids)
            tied = [np.sum(np.abs(want.scores - want.scores[i]) <= 1e-6) > 1 for i in differ]
            assert all(tied), (space, differ)


class Stack:
    """Two candidate shard servers and a ranker scattering over them, in this process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shards: list[Any] = []
        self.ports: list[int] = []

    async def start_shard(self, i: int, port: int = 0) -> None:
        server, servicer = await create_candidate(
            CandidateConfig(port=port, shard=i, reload_check_s=0), self.root
        )
        if i < len(self.shards):
            self.shards[i] = (server, servicer)
        else:
            self.shards.append((server, servicer))
            self.ports.append(server.port)

    async def start(self) -> None:
        for i in range(2):
            await self.start_shard(i)
        self.ranker, self.pipeline = await create_ranker(
            RankerConfig(
                port=0,
                candidate_shards=tuple(f"127.0.0.1:{p}" for p in self.ports),
                item_refresh_s=0,
                reload_check_s=0,
                rerank=STATELESS,
                reliability=RELAXED,
            ),
            self.root,
        )
        self.address = f"127.0.0.1:{self.ranker.port}"

    async def stop(self) -> None:
        await self.ranker.stop(0)
        for server, _ in self.shards:
            await server.stop(0)


@pytest_asyncio.fixture(loop_scope="session")
async def stack(sharded_root: Path) -> AsyncIterator[Stack]:
    s = Stack(sharded_root)
    await s.start()
    yield s
    await s.stop()


async def _rank(address: str, user: int, debug: bool = False) -> sieve_pb2.RankResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = sieve_pb2_grpc.RankerServiceStub(ch)
        return await stub.Rank(sieve_pb2.RankRequest(user_id=user, debug=debug), timeout=30)


async def test_rank_over_two_shards_equals_rank_over_the_whole_index(
    stack: Stack, sharded_root: Path
) -> None:
    whole, _ = await create_candidate(CandidateConfig(port=0, reload_check_s=0), sharded_root)
    ranker, _ = await create_ranker(
        RankerConfig(
            port=0,
            candidate_address=f"127.0.0.1:{whole.port}",
            item_refresh_s=0,
            rerank=STATELESS,
            reliability=RELAXED,
        ),
        sharded_root,
    )
    try:
        for user in USERS:
            a = await _rank(stack.address, user, debug=True)
            b = await _rank(f"127.0.0.1:{ranker.port}", user, debug=True)
            assert not a.rungs and not b.rungs, (a.degradations, b.degradations)
            assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
            assert [list(i.sources) for i in a.items] == [list(i.sources) for i in b.items]
            np.testing.assert_allclose(
                [i.final_score for i in a.items], [i.final_score for i in b.items], rtol=1e-5
            )
    finally:
        await ranker.stop(0)
        await whole.stop(0)


async def test_a_shard_down_gives_partial_answers_then_full_ones_when_it_returns(
    stack: Stack,
) -> None:
    full = await _rank(stack.address, 42)
    assert not full.rungs
    server, _ = stack.shards[1]
    await server.stop(0)
    for user in USERS:  # no call fails: the other shard's candidates are ranked
        r = await _rank(stack.address, user, debug=True)
        assert list(r.rungs) == ["partial_candidates"], r.degradations
        (why,) = [d for d in r.degradations if d.startswith("partial_candidates")]
        assert "coverage 50% (1 of 2 shards; shard 1: " in why
        assert len(r.items) == 50
        learned = [i.item_id for i in r.items if "learned" in i.sources]
        assert learned and (shard_of(np.array(learned), 2) == 0).all()
    await stack.start_shard(1, stack.ports[1])  # back on its port

    async def full_again() -> bool:
        return not (await _rank(stack.address, 42)).rungs

    took = await until(full_again, 5.0, "full answers after the shard returned")
    assert took < 5.0
    back = await _rank(stack.address, 42)
    assert [i.item_id for i in back.items] == [i.item_id for i in full.items]


async def test_a_shard_at_the_wrong_address_is_not_merged(stack: Stack, sharded_root: Path) -> None:
    """Addresses listed in the wrong order: each answer says which shard it is, so
    the ranker refuses both instead of merging a shard twice (or none)."""
    ranker, _ = await create_ranker(
        RankerConfig(
            port=0,
            candidate_shards=tuple(f"127.0.0.1:{p}" for p in reversed(stack.ports)),
            item_refresh_s=0,
            rerank=STATELESS,
            reliability=RELAXED,
        ),
        sharded_root,
    )
    try:
        r = await _rank(f"127.0.0.1:{ranker.port}", 42)
        assert "popular_items" in r.rungs or "cached_response" in r.rungs
        assert any("answered as shard 1 of 2" in d for d in r.degradations), r.degradations
    finally:
        await ranker.stop(0)


async def test_a_new_set_goes_live_only_once_every_shard_holds_it(stack: Stack) -> None:
    root = stack.root
    old = artifacts.current_version(root)
    artifacts.clone_version(root / "versions" / old, root / "versions" / "sharded2b", link=True)
    artifacts.publish(root, "sharded2b")
    try:
        assert await stack.shards[0][1].reload()
        assert not await stack.pipeline.reload()  # shard 1 still holds only the old set
        assert stack.pipeline.version == old
        r = await _rank(stack.address, 42)
        assert r.artifact_version == old and not r.rungs
        assert await stack.shards[1][1].reload()
        assert await stack.pipeline.reload()
        r = await _rank(stack.address, 42)
        assert r.artifact_version == "sharded2b" and not r.rungs
    finally:
        artifacts.publish(root, old)
