"""Sharding the catalog: the partition, and the merge of the shards' top-k."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from pydantic import ValidationError

from candidate.index import CandidateIndex, build_index
from candidate.shards import shard_of
from protos.sieve.v1 import sieve_pb2
from ranker.scatter import merge_responses, merge_top
from sieve.manifest import ShardsSection


def _splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_shard_of_is_stable_balanced_and_total() -> None:
    ids = np.arange(1, 100_001, dtype=np.int64)
    s = shard_of(ids, 4)
    assert s.min() == 0 and s.max() == 3
    sizes = np.bincount(s, minlength=4)
    assert np.abs(sizes - 25_000).max() < 600  # consecutive ids spread evenly
    # the shard of an id depends on the id alone, not on its neighbours or order
    assert (shard_of(ids[::-1], 4) == s[::-1]).all()
    # splitmix64 as its reference writes it: a set's partition never changes under it
    for x in (1, 2, 7, 193_609, 123_456_789_012):
        assert shard_of(np.array([x]), 7)[0] == _splitmix64(x) % 7
    # MovieLens-like gaps and huge ids stay in range
    odd = np.array([1, 2**62, 2**63 - 1, 193_609], np.int64)
    assert ((shard_of(odd, 3) >= 0) & (shard_of(odd, 3) < 3)).all()


def test_shards_section_needs_a_size_per_shard() -> None:
    assert ShardsSection(count=2, ntotal=(3, 4)).ntotal == (3, 4)
    with pytest.raises(ValidationError, match="2 shard sizes for 3 shards"):
        ShardsSection(count=3, ntotal=(3, 4))
    with pytest.raises(ValidationError):
        ShardsSection(count=1, ntotal=(3,))


def _exact(vectors: np.ndarray, ids: np.ndarray, cats: dict[str, np.ndarray]) -> CandidateIndex:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    users = np.empty((0, vectors.shape[1]), np.float32)
    return CandidateIndex(index, ids, np.empty(0, np.int64), users, {}, cats)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_merged_top_k_of_exact_shards_is_the_exact_top_k(count: int) -> None:
    rng = np.random.default_rng(count)
    n, d = 6000, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = rng.choice(10**9, n, replace=False).astype(np.int64)
    drama = rng.random(n) < 0.3
    whole = _exact(x, ids, {"Drama": drama})
    which = shard_of(ids, count)
    shards = [
        _exact(x[which == i], ids[which == i], {"Drama": drama[which == i]}) for i in range(count)
    ]
    for q in range(20):
        v = rng.standard_normal(d).astype(np.float32)
        v /= np.linalg.norm(v)
        exclude = rng.choice(ids, 300, replace=False)
        allow = ["Drama"] if q % 2 else None
        want = whole.search(v, 500, exclude, allow)
        got_ids, got_scores = merge_top(
            [(r.item_ids, r.scores) for r in (s.search(v, 500, exclude, allow) for s in shards)],
            500,
        )
        assert (got_ids == want.item_ids).all()
        np.testing.assert_allclose(got_scores, want.scores, rtol=1e-6)


def test_merge_of_ivf_shards_keeps_the_recall() -> None:
    """Shards trained on their own items, same factory and nprobe: the merge's
    recall against exact search is at least the whole IVF index's."""
    rng = np.random.default_rng(7)
    n, d, k = 20_000, 32, 200
    centres = rng.standard_normal((50, d)).astype(np.float32)
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(1, n + 1, dtype=np.int64)
    none = np.empty(0, np.int64)
    params = {"nprobe": 8}

    def served(vectors: np.ndarray, item_ids: np.ndarray) -> CandidateIndex:
        index = build_index(vectors, "IVF64,Flat", 0, 10_000)
        users = np.empty((0, d), np.float32)
        return CandidateIndex(index, item_ids, np.empty(0, np.int64), users, params)

    which = shard_of(ids, 2)
    whole = served(x, ids)
    shards = [served(x[which == i], ids[which == i]) for i in range(2)]
    exact = _exact(x, ids, {})
    whole_hits = shard_hits = 0
    for _ in range(30):
        v = x[rng.integers(n)] + 0.1 * rng.standard_normal(d).astype(np.float32)
        truth = set(exact.search(v, k, none).item_ids.tolist())
        whole_hits += len(truth & set(whole.search(v, k, none).item_ids.tolist()))
        merged, _ = merge_top(
            [(r.item_ids, r.scores) for r in (s.search(v, k, none) for s in shards)], k
        )
        shard_hits += len(truth & set(merged.tolist()))
    assert shard_hits / (30 * k) >= whole_hits / (30 * k) - 0.01
    assert shard_hits / (30 * k) > 0.8


def test_merge_responses_merges_every_space_and_drops_a_partial_more() -> None:
    def resp(ids: list[int], scores: list[float], more: bool = True) -> sieve_pb2.RetrieveResponse:
        return sieve_pb2.RetrieveResponse(
            item_ids=ids,
            scores=scores,
            artifact_version="v1",
            search_us=len(ids),
            more=[sieve_pb2.SpaceResult(source="text", item_ids=ids[::-1], scores=scores)]
            if more
            else [],
        )

    a, b = resp([1, 2, 3], [0.9, 0.5, 0.1]), resp([10, 20], [0.7, 0.6])
    m = merge_responses([a, b], 3, [2])
    assert list(m.item_ids) == [1, 10, 20]
    assert m.artifact_version == "v1" and m.search_us == 3
    assert list(m.more[0].item_ids) == [3, 20] and m.more[0].source == "text"
    assert len(merge_responses([a, resp([10], [0.7], more=False)], 3, [2]).more) == 0
