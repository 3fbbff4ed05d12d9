"""The RPC contract over real loopback servers: Rank, Retrieve, health, reflection."""

from __future__ import annotations

import asyncio

import faiss
import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve import artifacts
from tests.conftest import RELAXED, STATELESS

STAGES = ["validate", "user_features", "retrieve", "item_features", "score", "rerank", "total"]


@pytest.fixture(scope="session")
def users(artifact_set: artifacts.ArtifactSet) -> pd.DataFrame:
    return pd.read_parquet(artifact_set.verified("user_features")).set_index("user_id")


@pytest.fixture(scope="session")
def catalog(artifact_set: artifacts.ArtifactSet) -> pd.DataFrame:
    return pd.read_parquet(artifact_set.verified("catalog"))


async def _rank(servers, **kw) -> sieve_pb2.RankResponse:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(servers["ranker"]) as ch:
        return await sieve_pb2_grpc.RankerServiceStub(ch).Rank(
            sieve_pb2.RankRequest(**kw), timeout=10
        )


async def _retrieve(servers, **kw) -> sieve_pb2.RetrieveResponse:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(servers["candidate"]) as ch:
        stub = sieve_pb2_grpc.CandidateServiceStub(ch)
        return await stub.Retrieve(sieve_pb2.RetrieveRequest(**kw), timeout=10)


@pytest.mark.parametrize("user_id", [1, 42, 414, 610])
async def test_rank_returns_50_distinct_unseen_items(servers, users, artifact_set, user_id) -> None:  # type: ignore[no-untyped-def]
    resp = await _rank(servers, user_id=user_id)
    ids = [i.item_id for i in resp.items]
    assert len(ids) == 50 and len(set(ids)) == 50
    assert not set(ids) & set(users.loc[user_id, "seen_item_ids"].tolist())
    assert resp.artifact_version == artifact_set.version
    assert list(resp.degradations) == []
    assert [t.stage for t in resp.timings] == STAGES
    assert all(t.micros >= 0 for t in resp.timings)
    assert resp.timings[-1].micros >= max(t.micros for t in resp.timings[:-1])
    # no score rule in the chain: the final score is the model's
    assert all(i.final_score == i.model_score for i in resp.items)
    assert all(0.0 <= i.model_score <= 1.0 and -1 <= i.candidate_rank < 1200 for i in resp.items)
    assert not any(i.moved_by for i in resp.items) and not resp.dropped  # debug off


async def test_every_candidate_source_reaches_the_lists_with_exact_scores(  # type: ignore[no-untyped-def]
    servers, users, catalog, artifact_set
) -> None:
    """Items come from several sources and say which; an item has a learned rank
    exactly when the learned ANN gave it; every candidate score is the learned
    user vector (the user tower's, at request time, which for an unchanged
    history is the stored one) . the item's learned vector."""
    emb = np.load(artifact_set.verified("item_embeddings"), mmap_mode="r")
    row = pd.Series(np.arange(len(catalog)), index=catalog["item_id"].to_numpy())
    seen_sources: set[str] = set()
    for user_id in (1, 42, 414, 610, 7, 100, 250, 500):
        resp = await _rank(servers, user_id=user_id)
        vector = np.asarray(users.loc[user_id, "user_vector"], np.float32)
        ids = [i.item_id for i in resp.items]
        want = np.asarray(emb[row.loc[ids].to_numpy()]) @ vector
        np.testing.assert_allclose([i.candidate_score for i in resp.items], want, atol=1e-4)
        for item in resp.items:
            assert item.sources and set(item.sources) <= {"learned", "text", "i2i", "popular"}
            assert ("learned" in item.sources) == (item.candidate_rank >= 0)
            seen_sources |= set(item.sources)
    assert len(seen_sources) >= 3, seen_sources


async def test_text_source_is_exact_over_the_text_space(servers, users, artifact_set) -> None:  # type: ignore[no-untyped-def]
    """Retrieve with source "text" searches the MiniLM space (the IndexFlatIP
    oracle over the text embeddings), by the stored text vector or a sent one."""
    user = users.loc[42]
    text = np.load(artifact_set.verified("text_embeddings"))
    ids = pd.read_parquet(artifact_set.verified("catalog"))["item_id"].to_numpy()
    exact = faiss.IndexFlatIP(text.shape[1])
    exact.add(text)
    scores, rows = exact.search(np.asarray(user["text_vector"], np.float32)[None], 300)
    by_vec = await _retrieve(
        servers, user_vector=sieve_pb2.UserVector(values=user["text_vector"]), k=100, source="text"
    )
    by_id = await _retrieve(servers, user_id=42, k=100, source="text")
    np.testing.assert_allclose(by_vec.scores, scores[0][:100], atol=1e-5)
    assert len(set(by_vec.item_ids) ^ set(ids[rows[0][:100]])) <= 2
    assert list(by_id.item_ids) == list(by_vec.item_ids)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _retrieve(servers, user_id=42, k=5, source="bm25")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source must be one of ['learned', 'text']" in err.value.details()


async def test_more_searches_answer_as_separate_calls_would(servers, users) -> None:  # type: ignore[no-untyped-def]
    """``more`` searches another space in the same call, with the main query's
    exclusions: each answer is the one a call of its own gives; a space asked
    twice, a bad k, a missing or wrong-sized vector name ``more[i]``."""
    user = users.loc[42]
    seen = user["seen_item_ids"]
    learned = sieve_pb2.UserVector(values=user["user_vector"])
    text = sieve_pb2.UserVector(values=user["text_vector"])
    both = await _retrieve(
        servers,
        user_vector=learned,
        k=200,
        exclude_item_ids=seen,
        more=[sieve_pb2.SpaceQuery(source="text", user_vector=text, k=50)],
    )
    alone = await _retrieve(servers, user_vector=learned, k=200, exclude_item_ids=seen)
    text_alone = await _retrieve(
        servers, user_vector=text, k=50, exclude_item_ids=seen, source="text"
    )
    assert list(both.item_ids) == list(alone.item_ids)
    (more,) = both.more
    assert more.source == "text" and list(more.item_ids) == list(text_alone.item_ids)
    np.testing.assert_allclose(more.scores, text_alone.scores, rtol=1e-6)
    assert not set(more.item_ids) & set(seen.tolist())
    bad = {
        "searches the learned space again": sieve_pb2.SpaceQuery(user_vector=learned, k=5),
        "more[0].k must be in 1..": sieve_pb2.SpaceQuery(source="text", user_vector=text, k=0),
        "more[0].user_vector is missing": sieve_pb2.SpaceQuery(source="text", k=5),
        "more[0].user_vector has 64 values, the index expects 384": sieve_pb2.SpaceQuery(
            source="text", user_vector=learned, k=5
        ),
        "more[0].source must be one of": sieve_pb2.SpaceQuery(source="bm25", k=5),
    }
    for message, query in bad.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _retrieve(servers, user_vector=learned, k=5, more=[query])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details(), err.value.details()


async def test_rank_applies_genre_cap_and_caller_exclusions(servers, catalog) -> None:  # type: ignore[no-untyped-def]
    first = await _rank(servers, user_id=42, k=20)
    drop = [i.item_id for i in first.items[:5]]
    again = await _rank(servers, user_id=42, k=20, exclude_item_ids=drop)
    assert len(again.items) == 20 and not {i.item_id for i in again.items} & set(drop)
    primary = catalog.set_index("item_id")["genres"].str.split("|").str[0]
    (cap,) = [r.cap for r in servers["ranker_config"].rerank.rules if r.name == "group_cap"]
    assert primary.loc[[i.item_id for i in first.items]].value_counts().max() <= cap


async def test_candidate_scores_are_the_exact_inner_products(servers, users, artifact_set) -> None:  # type: ignore[no-untyped-def]
    """The Flat index is exact: Retrieve's answer is the IndexFlatIP oracle's."""
    user = users.loc[42]
    resp = await _retrieve(
        servers,
        user_vector=sieve_pb2.UserVector(values=user["user_vector"]),
        k=1000,
        exclude_item_ids=user["seen_item_ids"],
    )
    emb = np.load(artifact_set.verified("item_embeddings"))
    ids = pd.read_parquet(artifact_set.verified("item_features"))["item_id"].to_numpy()
    exact = faiss.IndexFlatIP(emb.shape[1])
    exact.add(emb.astype(np.float32))
    scores, rows = exact.search(np.asarray(user["user_vector"], np.float32)[None], 1000 + 2000)
    keep = ~np.isin(ids[rows[0]], user["seen_item_ids"])
    want_ids, want_scores = ids[rows[0]][keep][:1000], scores[0][keep][:1000]
    np.testing.assert_allclose(resp.scores, want_scores, atol=1e-5)
    assert len(set(resp.item_ids) ^ set(want_ids)) <= 2  # a tie at the boundary at most


async def test_retrieve_by_user_id_equals_by_vector(servers, users) -> None:  # type: ignore[no-untyped-def]
    by_id = await _retrieve(servers, user_id=7, k=100)
    by_vec = await _retrieve(
        servers, user_vector=sieve_pb2.UserVector(values=users.loc[7, "user_vector"]), k=100
    )
    assert list(by_id.item_ids) == list(by_vec.item_ids) and len(by_id.item_ids) == 100
    excluded = list(by_id.item_ids[:30])
    fewer = await _retrieve(servers, user_id=7, k=100, exclude_item_ids=excluded)
    assert len(fewer.item_ids) == 100 and not set(fewer.item_ids) & set(excluded)


async def test_unknown_user_gets_popular_items_and_a_degradation(servers) -> None:  # type: ignore[no-untyped-def]
    resp = await _rank(servers, user_id=987654321, k=10)
    assert len(resp.items) == 10
    assert len(resp.degradations) == 1 and resp.degradations[0].startswith("cold_start_user")
    assert all(list(i.sources) == ["popular"] for i in resp.items)
    pops = [i.final_score for i in resp.items]
    assert pops == sorted(pops, reverse=True) and pops[0] > 0


@pytest.mark.parametrize(
    ("request_kw", "message"),
    [
        ({"user_id": 1, "k": 501}, "k must be in 1..500"),
        ({"user_id": 1, "k": -3}, "k must be in 1..500"),
        ({"user_id": 0}, "user_id must be a positive integer, got 0"),
        ({"user_id": -5}, "user_id must be a positive integer, got -5"),
        (
            {"user_id": 1, "exclude_item_ids": list(range(1, 10_002))},
            "holds 10001 ids, at most 10000",
        ),
        ({"user_id": 1, "exclude_item_ids": [3, -1]}, "exclude_item_ids must be positive"),
    ],
)
async def test_rank_bad_input_is_invalid_argument(servers, request_kw, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _rank(servers, **request_kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


@pytest.mark.parametrize(
    ("request_kw", "code", "message"),
    [
        ({"k": 10}, grpc.StatusCode.INVALID_ARGUMENT, "set either user_vector or user_id"),
        ({"user_id": 1, "k": 0}, grpc.StatusCode.INVALID_ARGUMENT, "k must be in 1..2048"),
        ({"user_id": 1, "k": 2049}, grpc.StatusCode.INVALID_ARGUMENT, "k must be in 1..2048"),
        (
            {"user_vector": sieve_pb2.UserVector(values=[0.1] * 10), "k": 5},
            grpc.StatusCode.INVALID_ARGUMENT,
            "has 10 values, the index expects 64",
        ),
        (
            {"user_vector": sieve_pb2.UserVector(values=[float("nan")] * 384), "k": 5},
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN or infinity",
        ),
        (
            {"user_id": 1, "k": 5, "exclude_item_ids": list(range(1, 20_002))},
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 20000",
        ),
        ({"user_id": 99999999, "k": 5}, grpc.StatusCode.NOT_FOUND, "has no stored vector"),
    ],
)
async def test_retrieve_bad_input(servers, request_kw, code, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _retrieve(servers, **request_kw)
    assert err.value.code() == code and message in err.value.details()


async def test_health_and_reflection(servers) -> None:  # type: ignore[no-untyped-def]
    for key, service in [
        ("candidate", "sieve.v1.CandidateService"),
        ("ranker", "sieve.v1.RankerService"),
    ]:
        async with grpc.aio.insecure_channel(servers[key]) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", service):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            replies = refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = [s.name async for r in replies for s in r.list_services_response.service]
            assert service in names and "grpc.health.v1.Health" in names


async def test_retrieve_allow_categories(servers, catalog) -> None:  # type: ignore[no-untyped-def]
    in_cats = catalog["genres"].str.contains("Film-Noir|Western")
    resp = await _retrieve(servers, user_id=42, k=100, allow_categories=["Film-Noir", "Western"])
    assert len(resp.item_ids) == 100
    genres = catalog.set_index("item_id")["genres"].loc[list(resp.item_ids)]
    assert genres.str.contains("Film-Noir|Western").all()
    # asking for more than there are returns every one of them
    everything = await _retrieve(
        servers, user_id=42, k=2000, allow_categories=["Film-Noir", "Western"]
    )
    assert sorted(everything.item_ids) == sorted(catalog["item_id"][in_cats])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _retrieve(servers, user_id=42, k=5, allow_categories=["Noir"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown categories ['Noir']" in err.value.details()


async def test_batched_server_answers_like_the_unbatched_one(
    servers, artifacts_root, users
) -> None:  # type: ignore[no-untyped-def]
    from candidate.config import CandidateConfig
    from candidate.service import create_server as create_candidate

    server, servicer = await create_candidate(
        CandidateConfig(port=0, batching="on", batch_max_wait_us=2000, reload_check_s=0),
        artifacts_root,
    )
    try:
        user_ids = [int(u) for u in users.index[:24]]

        async def ask(address: str, user: int) -> sieve_pb2.RetrieveResponse:
            seen = users.loc[user, "seen_item_ids"]
            async with grpc.aio.insecure_channel(address) as ch:
                stub = sieve_pb2_grpc.CandidateServiceStub(ch)
                req = sieve_pb2.RetrieveRequest(user_id=user, k=500, exclude_item_ids=seen)
                return await stub.Retrieve(req, timeout=30)

        batched = await asyncio.gather(*(ask(f"127.0.0.1:{server.port}", u) for u in user_ids))
        plain = await asyncio.gather(*(ask(servers["candidate"], u) for u in user_ids))
        for b, p in zip(batched, plain, strict=True):
            assert list(b.item_ids) == list(p.item_ids)
            np.testing.assert_allclose(b.scores, p.scores, atol=1e-5)
        assert servicer.batcher is not None and max(servicer.batcher.batch_sizes) > 1
    finally:
        await server.stop(0)


@pytest.mark.parametrize(("concurrency", "max_requests"), [(1, 32), (2, 4)])
async def test_score_batching_gives_the_same_rankings(  # type: ignore[no-untyped-def]
    servers, artifacts_root, concurrency: int, max_requests: int
) -> None:
    from ranker.config import RankerConfig
    from ranker.context import RankQuery
    from ranker.pipeline import RankPipeline

    cfg = RankerConfig(
        port=0,
        item_refresh_s=0,
        candidate_address=servers["candidate"],
        reliability=RELAXED,
        score_batching="on",
        score_batch_max_wait_us=5000,
        score_batch_max_requests=max_requests,
        score_batch_concurrency=concurrency,
        rerank=STATELESS,
    )
    batched = RankPipeline(cfg, artifacts_root)
    await batched.start()
    try:
        queries = [RankQuery(u, 50, np.empty(0, np.int64), False) for u in range(1, 25)]
        got = await asyncio.gather(*(batched.rank(q) for q in queries))
        want = [await servers["pipeline"].rank(q) for q in queries]
        assert batched.score_batcher is not None and max(batched.score_batcher.batch_sizes) > 1
    finally:
        await batched.close()
    for g, w in zip(got, want, strict=True):
        assert g.item_ids.tolist() == w.item_ids.tolist()
        np.testing.assert_allclose(g.model_scores, w.model_scores, atol=1e-6)


async def test_int8_student_serves_close_to_fp32(servers, artifacts_root) -> None:  # type: ignore[no-untyped-def]
    from ranker.config import RankerConfig
    from ranker.context import RankQuery
    from ranker.pipeline import RankPipeline

    cfg = RankerConfig(
        port=0,
        item_refresh_s=0,
        candidate_address=servers["candidate"],
        reliability=RELAXED,
        model="int8",
        rerank=STATELESS,
    )
    int8 = RankPipeline(cfg, artifacts_root)
    await int8.start()
    try:
        live = int8.sets.live
        assert live is not None and live.scorer.path.endswith("ranker_int8.onnx")
        overlap = []
        for u in (1, 42, 414, 610):
            q = RankQuery(u, 50, np.empty(0, np.int64), False)
            got, want = await int8.rank(q), await servers["pipeline"].rank(q)
            assert got.degradations == [] and len(got.item_ids) == 50
            overlap.append(len(set(got.item_ids.tolist()) & set(want.item_ids.tolist())) / 50)
        assert np.mean(overlap) >= 0.8, overlap
    finally:
        await int8.close()


@pytest.mark.parametrize("threads", [0, 1, 3])
async def test_search_threads_bound_the_searches_run_at_once(artifacts_root, threads) -> None:  # type: ignore[no-untyped-def]
    # Six Retrieve calls at once: the service searches `search_threads` of them at
    # a time (0: one, on the event loop) and queues the rest (each search is held
    # 50 ms to make overlap visible).
    import threading
    import time

    from candidate.config import CandidateConfig
    from candidate.service import create_server

    server, servicer = await create_server(
        CandidateConfig(port=0, search_threads=threads), artifacts_root
    )
    lock, active, most = threading.Lock(), [0], [0]
    try:
        index = servicer.sets.pick().index
        search = index.search

        def held(*args):  # type: ignore[no-untyped-def]
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            try:
                time.sleep(0.05)
                return search(*args)
            finally:
                with lock:
                    active[0] -= 1

        index.search = held
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = sieve_pb2_grpc.CandidateServiceStub(ch)
            calls = [
                stub.Retrieve(sieve_pb2.RetrieveRequest(user_id=u, k=20), timeout=10)
                for u in (1, 2, 3, 4, 5, 6)
            ]
            answers = await asyncio.gather(*calls)
        assert all(len(a.item_ids) == 20 for a in answers)
        assert most[0] == max(threads, 1)
    finally:
        await server.stop(0)


async def test_a_failing_user_tower_takes_the_stored_vector_rung(servers, users) -> None:  # type: ignore[no-untyped-def]
    """The user tower over the live set's own item vectors gives the stored vector
    (same tower, same history); when it fails (here: item vectors of the wrong
    dimension for its input), the stored vector answers and the rung says why."""
    import dataclasses
    import time

    from ranker import stages
    from ranker.config import StageBudgetMs
    from ranker.context import RankContext, RankQuery
    from ranker.resilience import Deadlines

    pipeline = servers["pipeline"]
    state = pipeline.sets.live
    frame = await state.reader.read(state.user_view, np.array([42], np.int64))

    def context() -> RankContext:
        return RankContext(RankQuery(42, 10, np.empty(0, np.int64), False),
                           Deadlines(StageBudgetMs(), time.perf_counter()))  # fmt: skip

    ok = context()
    vector = stages.request_vector(state, ok, frame)
    np.testing.assert_allclose(vector, users.loc[42, "user_vector"], atol=1e-5)
    assert ok.rungs == []
    broken = dataclasses.replace(state, embeddings=np.zeros((len(state.catalog), 3), np.float32))
    ctx = context()
    vector = stages.request_vector(broken, ctx, frame)
    np.testing.assert_array_equal(vector, users.loc[42, "user_vector"])
    assert ctx.rungs == ["stored_user_vector"]
    assert ctx.degradations[0].startswith("user_tower_failed: ")
