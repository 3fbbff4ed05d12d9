"""The re-rank stage through real Rank calls: explanations, fatigue across
requests (in process and through a real Redis), config refused at start."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pandas as pd
import pytest
import pytest_asyncio

from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import HistoryConfig, RankerConfig, RerankConfig
from ranker.rerank import AllowCategories, GroupCap, Seen
from sieve import artifacts
from sieve.errors import ArtifactError
from tests.conftest import RELAXED


@pytest.fixture(scope="session")
def primary(artifact_set: artifacts.ArtifactSet) -> pd.Series:
    """item id -> primary genre code, as the ranker's item table holds it."""
    items = pd.read_parquet(artifact_set.verified("item_features"))
    return items.set_index("item_id")["primary_genre"]


async def _rank(address: str, **kw) -> sieve_pb2.RankResponse:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(address) as ch:
        return await sieve_pb2_grpc.RankerServiceStub(ch).Rank(
            sieve_pb2.RankRequest(**kw), timeout=10
        )


@pytest_asyncio.fixture(loop_scope="session")
async def ranker_with(servers, artifacts_root: Path) -> AsyncIterator:  # type: ignore[no-untyped-def]
    """Start extra rankers (against the shared candidate server) with a config."""
    from ranker.service import create_server

    started = []

    async def start(**kw) -> str:  # type: ignore[no-untyped-def]
        cfg = RankerConfig(
            port=0,
            item_refresh_s=0,
            candidate_address=servers["candidate"],
            reliability=RELAXED,
            **kw,
        )
        server, _ = await create_server(cfg, artifacts_root)
        started.append(server)
        return f"127.0.0.1:{server.port}"

    yield start
    for server in started:
        await server.stop(0)


async def test_debug_explains_every_move_and_drop(servers, primary) -> None:  # type: ignore[no-untyped-def]
    plain = await _rank(servers["ranker"], user_id=42, k=20)
    resp = await _rank(servers["ranker"], user_id=42, k=20, debug=True)
    assert [i.item_id for i in resp.items] == [i.item_id for i in plain.items]
    assert not any(i.moved_by for i in plain.items) and not plain.dropped
    rules = {r.name for r in servers["ranker_config"].rerank.rules}
    steps = [s for i in resp.items for s in i.moved_by]
    assert steps and {s.split(":")[0] for s in steps} <= rules
    assert any(s.startswith("mmr: #") for s in steps)
    # what the rules pushed out of the model's own top 20 is listed, with the rule
    pushed = [d for d in resp.dropped if d.reason.startswith("moved from #")]
    assert pushed and all(d.rule in ("mmr", "group_cap") for d in pushed)
    returned = {i.item_id for i in resp.items}
    assert not returned & {d.item_id for d in resp.dropped}
    # each pushed-out item was in the model's top 20, so it outscores whatever
    # the rules brought in from below
    assert min(d.model_score for d in pushed) >= min(i.model_score for i in resp.items)
    assert len(pushed) == 20 - sum(1 for i in resp.items if _model_rank(i) < 20)
    assert primary.loc[list(returned)].value_counts().max() <= 5  # group_cap 5


def _model_rank(item: sieve_pb2.RankedItem) -> int:
    """The item's position in model-score order, from its first explanation step
    ('<rule>: #a -> #b': a is 1-based), or its place if no rule moved it."""
    if not item.moved_by:
        return -1  # unmoved items keep their model position, inside the top k
    return int(item.moved_by[0].split("#")[1].split(" ")[0]) - 1


async def test_fatigue_turns_the_page(servers, ranker_with, primary) -> None:  # type: ignore[no-untyped-def]
    """Default chain (fatigue on, in-process history): the second request for a
    user shows none of the first one's items and demotes their genres."""
    address = await ranker_with()  # defaults
    page1 = await _rank(address, user_id=414, k=10)
    page2 = await _rank(address, user_id=414, k=10, debug=True)
    ids1, ids2 = [i.item_id for i in page1.items], [i.item_id for i in page2.items]
    assert len(ids2) == 10 and not set(ids1) & set(ids2)
    # without fatigue the same request answers the same page again
    again = await _rank(servers["ranker"], user_id=414, k=10)
    stateless = await _rank(servers["ranker"], user_id=414, k=10)
    assert [i.item_id for i in again.items] == [i.item_id for i in stateless.items]
    genres1 = set(primary.loc[ids1])
    for item in page2.items:
        fatigue = [s for s in item.moved_by if s.startswith("fatigue:") and "score" in s]
        if primary.loc[item.item_id] in genres1:  # its genre was shown: demoted
            assert fatigue and item.final_score < item.model_score, item
        else:
            assert not fatigue and item.final_score == item.model_score, item


async def test_fatigue_history_is_shared_through_redis(ranker_with, redis_server) -> None:  # type: ignore[no-untyped-def]
    history = HistoryConfig(
        store="redis", redis_url=f"redis://{redis_server}/0", key_prefix=f"t{uuid.uuid4().hex}"
    )
    rerank = RerankConfig(history=history)
    a = await ranker_with(rerank=rerank)
    b = await ranker_with(rerank=rerank)
    page1 = await _rank(a, user_id=610, k=10)
    page2 = await _rank(b, user_id=610, k=10)  # another replica
    page3 = await _rank(a, user_id=610, k=10)
    pages = [{i.item_id for i in p.items} for p in (page1, page2, page3)]
    assert all(len(p) == 10 for p in pages)
    assert not pages[0] & pages[1] and not pages[2] & (pages[0] | pages[1])


async def test_short_candidate_list_returns_what_there_is(ranker_with) -> None:  # type: ignore[no-untyped-def]
    rules = (Seen(), AllowCategories(categories=("Film-Noir",)), GroupCap(cap=5))
    address = await ranker_with(rerank=RerankConfig(rules=rules))
    resp = await _rank(address, user_id=42, k=50, debug=True)
    assert 0 < len(resp.items) < 50
    notes = list(resp.degradations)
    assert any(d.startswith(f"short_list: only {len(resp.items)} candidates") for d in notes)
    assert {d.rule for d in resp.dropped} == {"allow_categories"}
    assert all("Film-Noir" in d.reason for d in resp.dropped)


async def test_rule_reading_an_unknown_attribute_is_refused_at_start(
    servers, artifacts_root
) -> None:  # type: ignore[no-untyped-def]
    from ranker.service import create_server

    cfg = RankerConfig(
        port=0,
        candidate_address=servers["candidate"],
        rerank=RerankConfig(rules=(Seen(), GroupCap(attribute="studio"))),
    )
    with pytest.raises(ArtifactError, match=r"ranker\.rerank\.rules\[1\] \(group_cap\).*'studio'"):
        await create_server(cfg, artifacts_root)


async def test_history_store_down_degrades_instead_of_failing(ranker_with) -> None:  # type: ignore[no-untyped-def]
    from sieve.local_redis import free_port

    history = HistoryConfig(store="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    address = await ranker_with(rerank=RerankConfig(history=history))
    resp = await _rank(address, user_id=42, k=10)
    assert len(resp.items) == 10
    assert [d.split(":")[0] for d in resp.degradations] == ["history_unavailable"]


async def test_history_read_of_a_request_that_stops_early_is_dropped_quietly(
    ranker_with, caplog
) -> None:  # type: ignore[no-untyped-def]
    # The shown-history read starts with the request, beside the user features. A
    # cold-start user gets popular items before the re-rank: the read's failure
    # must neither reach the answer nor be logged by asyncio as never retrieved.
    import gc

    from sieve.local_redis import free_port

    history = HistoryConfig(store="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    address = await ranker_with(rerank=RerankConfig(history=history))
    for _ in range(3):
        resp = await _rank(address, user_id=99_999_999, k=10)
        assert len(resp.items) == 10
        assert [d.split(":")[0] for d in resp.degradations] == ["cold_start_user"]
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
