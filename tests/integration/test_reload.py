"""Hot reload: no failed call during a swap, bad sets refused, and index, model and
features going live as one unit across both services."""

from __future__ import annotations

import asyncio
import threading
import weakref
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from candidate.config import CandidateConfig
from candidate.service import create_server as create_candidate
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.context import RankQuery
from ranker.pipeline import RankPipeline
from ranker.service import create_server as create_ranker
from ranker.user_tower import UserTower
from sieve import artifacts
from sieve.ids import IdIndex
from tests.conftest import RELAXED, STATELESS, copy_artifacts


def clone_version(root: Path, src: str, new: str) -> Path:
    """A copy of version ``src`` as ``new`` (copies: rescaled_version writes into it)."""
    return artifacts.clone_version(root / "versions" / src, root / "versions" / new)


def rescaled_version(root: Path, src: str, new: str, factor: float) -> Path:
    """A new version whose item embeddings and (exact) index are ``factor`` times the
    source's: the same neighbours, every ANN score scaled, so which set answered a
    call shows in its scores."""
    folder = clone_version(root, src, new)
    emb = np.load(folder / "item_embeddings.npy") * np.float32(factor)
    np.save(folder / "item_embeddings.npy", emb)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    faiss.write_index(index, str(folder / "index.faiss"))
    m = artifacts.load(root, new).manifest
    files = {r: artifacts.file_entry(folder, m.files[r].path) for r in ("index", "item_embeddings")}
    index = m.index.model_copy(update={"factory": "Flat", "search_params": ""})
    artifacts.write_manifest(
        folder, m.model_copy(update={"files": {**m.files, **files}, "index": index})
    )
    return folder


def _learned_scores(root: Path, version: str, user: int, item_ids: list[int]) -> np.ndarray:
    """What a ranker serving ``version`` gives as candidate scores: its user tower
    over the user's last items' vectors in that set, . the items' vectors there."""
    aset = artifacts.load(root, version)
    vectors = np.load(aset.verified("item_embeddings"))
    row = IdIndex(aset.read_catalog(["item_id"])["item_id"].to_numpy(np.int64))
    users = pd.read_parquet(aset.verified("user_features")).set_index("user_id")
    tower = UserTower(str(aset.verified("user_tower")), aset.manifest.retriever)  # type: ignore[arg-type]
    tower.load()
    recent = row.rows(np.asarray(users.loc[user, "recent_item_ids"], np.int64))[0]
    u = tower.vector(vectors[recent])
    return vectors[row.rows(np.asarray(item_ids, np.int64))[0]] @ u


async def _retrieve(address: str, **kw) -> sieve_pb2.RetrieveResponse:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(address) as ch:
        stub = sieve_pb2_grpc.CandidateServiceStub(ch)
        return await stub.Retrieve(sieve_pb2.RetrieveRequest(**kw), timeout=30)


class Loops:
    """Concurrent call loops on one server: every answer and every error, in order,
    and a way to wait for a number of answers."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.answers: list[Any] = []
        self.errors: list[grpc.aio.AioRpcError] = []
        self._stop = asyncio.Event()
        self._reached = asyncio.Event()
        self._target = 0

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def record(self, answer: Any) -> None:
        self.answers.append(answer)
        if len(self.answers) >= self._target:
            self._reached.set()

    async def until(self, n: int) -> None:
        """Wait until ``n`` answers have arrived in total."""
        self._target = n
        self._reached.clear()
        if len(self.answers) < n:
            await self._reached.wait()

    def stop(self) -> None:
        self._stop.set()


class Calls(Loops):
    """Concurrent Retrieve loops that record, per answer, whether the call started
    after the swap, and its version; and every error."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.swapped = False  # set by the test right after reload() swaps

    @property
    def versions(self) -> list[str]:
        return [version for _, version in self.answers]

    async def loop(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            stub = sieve_pb2_grpc.CandidateServiceStub(ch)
            while self.running:
                after = self.swapped
                try:
                    r = await stub.Retrieve(sieve_pb2.RetrieveRequest(user_id=7, k=200))
                    assert len(r.item_ids) == 200
                    self.record((after, r.artifact_version))
                except grpc.aio.AioRpcError as e:
                    self.errors.append(e)


async def test_swap_under_concurrent_calls_then_refuse_a_corrupt_set(
    artifacts_root: Path, tmp_path: Path
) -> None:
    root = copy_artifacts(artifacts_root, tmp_path)
    v1 = artifacts.current_version(root)
    server, servicer = await create_candidate(CandidateConfig(port=0, reload_check_s=0), root)
    calls = Calls(f"127.0.0.1:{server.port}")
    workers = [asyncio.create_task(calls.loop()) for _ in range(8)]
    try:
        await calls.until(40)
        assert not await servicer.reload()  # nothing new yet

        clone_version(root, v1, "zz_v2")
        artifacts.publish(root, "zz_v2")
        assert await servicer.reload()
        calls.swapped = True
        swapped_at = len(calls.versions)
        await calls.until(swapped_at + 80)

        # a corrupt set: the index no longer matches its checksum
        bad = clone_version(root, "zz_v2", "zz_v3")
        (bad / "index.faiss").write_bytes(b"\x00" * 64)
        artifacts.publish(root, "zz_v3")
        assert not await servicer.reload()
        assert not await servicer.reload()  # refused once, not retried in a loop
        refused_at = len(calls.versions)
        await calls.until(refused_at + 40)
    finally:
        calls.stop()
        await asyncio.gather(*workers)

    assert calls.errors == []
    assert calls.versions[0] == v1 and set(calls.versions) == {v1, "zz_v2"}
    # calls in flight during the swap may finish on v1; none that started after it
    after = [version for started_after, version in calls.answers if started_after]
    assert len(after) >= 80 and set(after) == {"zz_v2"}
    assert servicer.version == "zz_v2"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    await server.stop(0)


class Ranks(Loops):
    """Concurrent Rank loops that record, per answer, whether it started after the
    ranker's swap, its user, version, items, ANN scores and degradations."""

    USERS = (1, 42, 414, 610)

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.swapped = False  # set by the test right after the ranker's reload() swaps

    async def loop(self, worker: int) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            stub = sieve_pb2_grpc.RankerServiceStub(ch)
            n = worker
            while self.running:
                user = self.USERS[n % len(self.USERS)]
                n += 1
                after = self.swapped
                try:
                    r = await stub.Rank(sieve_pb2.RankRequest(user_id=user), timeout=30)
                    self.record((after, user, r))
                except grpc.aio.AioRpcError as e:
                    self.errors.append(e)


@pytest.mark.parametrize("score_batching", ["off", "on"])
async def test_ranker_and_candidate_go_live_with_a_new_set_as_one_unit(
    artifacts_root: Path, tmp_path: Path, score_batching: str
) -> None:
    # With score batching on, a finished batch must not keep the retired set alive.
    root = copy_artifacts(artifacts_root, tmp_path)
    v1 = artifacts.current_version(root)
    cserver, cservicer = await create_candidate(CandidateConfig(port=0, reload_check_s=0), root)
    rconfig = RankerConfig(
        port=0,
        candidate_address=f"127.0.0.1:{cserver.port}",
        item_refresh_s=0,
        reliability=RELAXED,
        reload_check_s=0,
        rerank=STATELESS,  # same request, same answer: compared below
        score_batching=score_batching,
    )
    rserver, pipeline = await create_ranker(rconfig, root)
    ranks = Ranks(f"127.0.0.1:{rserver.port}")
    workers = [asyncio.create_task(ranks.loop(i)) for i in range(8)]
    try:
        await ranks.until(24)
        assert not await pipeline.reload()  # nothing new yet

        rescaled_version(root, v1, "zz_v2", 0.5)
        artifacts.publish(root, "zz_v2")
        # The ranker loads v2 beside v1 but keeps serving v1: the candidate lacks v2.
        assert not await pipeline.reload()
        assert pipeline.version == v1
        await ranks.until(len(ranks.answers) + 24)
        assert not await pipeline.reload()  # probed again, still not there
        assert await cservicer.reload()
        assert cservicer.versions == ("zz_v2", v1)
        # Candidate on v2, ranker still on v1: its pinned calls keep being answered by v1.
        await ranks.until(len(ranks.answers) + 24)
        retired_on: list[str] = []  # the thread that freed v1's set: not the loop's
        weakref.finalize(
            pipeline.sets.live, lambda: retired_on.append(threading.current_thread().name)
        )
        assert await pipeline.reload()
        # The last reference may go a moment after reload() returns (a finished
        # request's frame on a worker thread); whoever drops it, not the loop.
        for _ in range(100):
            if retired_on:
                break
            await asyncio.sleep(0.05)
        assert retired_on and retired_on != [threading.current_thread().name], retired_on
        ranks.swapped = True
        assert pipeline.version == "zz_v2"
        swapped_at = len(ranks.answers)
        await ranks.until(swapped_at + 48)
    finally:
        ranks.stop()
        await asyncio.gather(*workers)

    assert ranks.errors == []
    versions = [r.artifact_version for _, _, r in ranks.answers]
    assert versions[0] == v1 and set(versions) == {v1, "zz_v2"}
    assert all(r.artifact_version == "zz_v2" for after, _, r in ranks.answers if after)
    assert all(r.artifact_version == "zz_v2" for _, _, r in ranks.answers[swapped_at + 8 :])
    for _, _, r in ranks.answers:
        bad = [d for d in r.degradations if d.startswith(("version_mismatch", "retrieve_failed"))]
        assert bad == [], bad
        assert len(r.items) == 50
    # Every answer is what its own version gives: v2's item vectors are half of v1's
    # (same neighbours, another user tower input), so a ranker on v1 fed by v2's
    # index would show in the scores, checked against each set's own files.
    reference: dict[tuple[int, str], sieve_pb2.RankResponse] = {}
    for _, user, r in ranks.answers:
        ref = reference.setdefault((user, r.artifact_version), r)
        assert [i.item_id for i in r.items] == [i.item_id for i in ref.items]
        np.testing.assert_allclose(
            [i.candidate_score for i in r.items], [i.candidate_score for i in ref.items], rtol=1e-5
        )
    for user in Ranks.USERS:
        old, new = reference[(user, v1)], reference[(user, "zz_v2")]
        for version, answer in ((v1, old), ("zz_v2", new)):
            ids = [i.item_id for i in answer.items]
            np.testing.assert_allclose(
                [i.candidate_score for i in answer.items],
                _learned_scores(root, version, user, ids),
                rtol=1e-4,
                atol=1e-6,
            )
    await rserver.stop(0)
    await cserver.stop(0)


async def test_pinned_retrieve_holds_keep_versions_sets_and_refuses_others(
    artifacts_root: Path, tmp_path: Path
) -> None:
    root = copy_artifacts(artifacts_root, tmp_path)
    v1 = artifacts.current_version(root)
    rescaled_version(root, v1, "zz_v2", 0.5)
    clone_version(root, v1, "zz_v3")
    config = CandidateConfig(
        port=0, batching="on", batch_max_wait_us=2000, keep_versions=2, reload_check_s=0
    )
    server, servicer = await create_candidate(config, root)
    address = f"127.0.0.1:{server.port}"
    pipeline = RankPipeline(
        RankerConfig(
            port=0,
            candidate_address=address,
            item_refresh_s=0,
            reload_check_s=0,
            reliability=RELAXED,
        ),
        root,
    )
    await pipeline.start()
    try:
        artifacts.publish(root, "zz_v2")
        assert await servicer.reload()
        assert servicer.versions == ("zz_v2", v1)

        # Batched: requests pinned to either version share batches, each searched on
        # its own version's index (v2's scores are half of v1's).
        pins = [v1, "zz_v2", ""] * 8
        got = await asyncio.gather(
            *(_retrieve(address, user_id=42, k=100, artifact_version=v) for v in pins)
        )
        assert servicer.batcher is not None and max(servicer.batcher.batch_sizes) > 1
        by_version = {}
        for pin, r in zip(pins, got, strict=True):
            assert r.artifact_version == (pin or "zz_v2")
            by_version.setdefault(r.artifact_version, r)
            assert list(r.item_ids) == list(by_version[r.artifact_version].item_ids)
        np.testing.assert_allclose(
            by_version["zz_v2"].scores, np.multiply(by_version[v1].scores, 0.5), rtol=1e-4
        )

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _retrieve(address, user_id=42, k=5, artifact_version="zz_nope")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert all(v in err.value.details() for v in ("zz_nope", "zz_v2", v1))

        artifacts.publish(root, "zz_v3")
        assert await servicer.reload()
        assert servicer.versions == ("zz_v3", "zz_v2")  # at most keep_versions sets
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _retrieve(address, user_id=42, k=5, artifact_version=v1)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"{v1!r} is not loaded here; loaded: zz_v3, zz_v2" in err.value.details()

        # A ranker still on v1 (the candidate no longer holds it) degrades, never fails.
        result = await pipeline.rank(RankQuery(42, 50, np.empty(0, np.int64), False))
        assert result.version == v1 and len(result.item_ids) == 50
        assert result.degradations[0].startswith("retrieve_failed: FAILED_PRECONDITION (")
        assert v1 in result.degradations[0]

        # A rollback to a held version swaps back without loading it again.
        artifacts.publish(root, "zz_v2")
        assert await servicer.reload()
        assert servicer.versions == ("zz_v2", "zz_v3")
    finally:
        await pipeline.close()
        await server.stop(0)


@pytest.mark.parametrize("batching", ["off", "on"])
async def test_a_retired_index_is_freed_off_the_event_loop(
    artifacts_root: Path, tmp_path: Path, batching: str
) -> None:
    # Freeing a 1M-item index takes 25 ms here; on the loop it would stall every call.
    # With batching on, a finished batch must not keep the set it searched alive.
    root = copy_artifacts(artifacts_root, tmp_path)
    v1 = artifacts.current_version(root)
    clone_version(root, v1, "zz_v2")
    config = CandidateConfig(port=0, keep_versions=1, reload_check_s=0, batching=batching)
    server, servicer = await create_candidate(config, root)
    try:
        address = f"127.0.0.1:{server.port}"
        assert (await _retrieve(address, user_id=42, k=5)).artifact_version == v1
        freed_on: list[str] = []
        weakref.finalize(
            servicer.sets.pick().index, lambda: freed_on.append(threading.current_thread().name)
        )
        artifacts.publish(root, "zz_v2")
        assert await servicer.reload()
        assert servicer.versions == ("zz_v2",)
        assert freed_on and freed_on != [threading.current_thread().name], freed_on
        assert (await _retrieve(address, user_id=42, k=5)).artifact_version == "zz_v2"
    finally:
        await server.stop(0)
