"""The ANN stage against an exact IndexFlatIP oracle, with exclusions."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from candidate.index import (
    Accelerated,
    CandidateIndex,
    SearchRequest,
    build_index,
    gpu_count,
    parse_search_params,
    read_index,
    resolve_auto,
    search_parameters,
    to_gpu,
    write_index,
)
from sieve.errors import InvalidRequest


def _data(n: int = 4000, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d))
    x = centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _oracle(x: np.ndarray, q: np.ndarray, k: int, excluded_rows: np.ndarray) -> np.ndarray:
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    scores, labels = exact.search(q.reshape(1, -1), k + len(excluded_rows))
    keep = ~np.isin(labels[0], excluded_rows)
    return labels[0][keep][:k], scores[0][keep][:k]


def _index(x: np.ndarray, factory: str, params: str = "nprobe=8") -> CandidateIndex:
    item_ids = np.arange(1000, 1000 + len(x)) * 3  # ids are not rows
    index = build_index(x, factory, train_size=2000)
    return CandidateIndex(index, item_ids, np.array([7]), x[:1], parse_search_params(params))


def test_flat_matches_exact_search_with_exclusions() -> None:
    x = _data()
    idx = _index(x, "Flat")
    rng = np.random.default_rng(1)
    for qi in rng.integers(0, len(x), 10):
        excluded_rows = rng.choice(len(x), 300, replace=False)
        res = idx.search(x[qi], 100, idx.item_ids[excluded_rows])
        want_rows, want_scores = _oracle(x, x[qi], 100, excluded_rows)
        assert len(res.item_ids) == 100
        assert not np.isin(res.item_ids, idx.item_ids[excluded_rows]).any()
        # tie-tolerant: same score profile; same set except at tied boundary scores
        np.testing.assert_allclose(res.scores, want_scores, rtol=0, atol=1e-5)
        boundary = want_scores[-1]
        sure = set(idx.item_ids[want_rows[want_scores > boundary + 1e-5]].tolist())
        assert sure <= set(res.item_ids.tolist())


@pytest.mark.parametrize(
    ("factory", "params", "k", "min_recall"),
    [
        ("IVF32,SQ8", "nprobe=16", 100, 0.9),
        ("IVF32,SQ8,RFlat", "nprobe=16,k_factor=2", 100, 0.95),
        ("IVF32,PQ16x4fs,RFlat", "nprobe=16,k_factor=4", 100, 0.9),
        ("IVF32,PQ16x4fs,Refine(SQfp16)", "nprobe=16,k_factor=4", 100, 0.9),
        ("IVF32,PQ16x4fsr,Refine(SQfp16)", "nprobe=16,k_factor=3", 100, 0.9),  # 1M default
        ("HNSW16", "efSearch=64", 1000, 0.9),  # efSearch is raised to k
    ],
)
def test_approximate_indexes_against_exact(
    factory: str, params: str, k: int, min_recall: float
) -> None:
    x = _data()
    idx = _index(x, factory, params)
    rng = np.random.default_rng(2)
    recalls = []
    for qi in rng.integers(0, len(x), 10):
        excluded_rows = rng.choice(len(x), 200, replace=False)
        res = idx.search(x[qi], k, idx.item_ids[excluded_rows])
        assert len(res.item_ids) == k and len(set(res.item_ids.tolist())) == k
        assert not np.isin(res.item_ids, idx.item_ids[excluded_rows]).any()
        want_rows, _ = _oracle(x, x[qi], k, excluded_rows)
        recalls.append(len(set(res.item_ids) & set(idx.item_ids[want_rows])) / k)
    assert np.mean(recalls) >= min_recall, (factory, np.mean(recalls))


def test_search_params_parsing_and_auto() -> None:
    assert parse_search_params("nprobe=128, k_factor=2") == {"nprobe": 128, "k_factor": 2}
    assert parse_search_params("") == {}
    with pytest.raises(ValueError, match="'nprob=3'"):
        parse_search_params("nprob=3")
    with pytest.raises(ValueError, match="nprobe must be a positive integer"):
        parse_search_params("nprobe=0")
    assert resolve_auto(9_742, "auto", "auto") == ("Flat", "")
    assert resolve_auto(1_000_000, "auto", "auto")[0].startswith("IVF4096,PQ192")
    assert resolve_auto(1_000_000, "auto", "auto", dim=64) == ("IVF4096,SQfp16", "nprobe=384")
    assert resolve_auto(1_000_000, "auto", "auto", k=100)[1] == "nprobe=64,k_factor=3"
    assert resolve_auto(1_000_000, "HNSW32", "auto") == ("HNSW32", "")
    assert resolve_auto(5, "auto", "nprobe=3") == ("Flat", "nprobe=3")


@pytest.mark.parametrize("factory", ["Flat", "IVF32,SQ8"])
def test_mmap_load_answers_like_memory_load(tmp_path, factory: str) -> None:  # type: ignore[no-untyped-def]
    x = _data()
    index = build_index(x, factory, train_size=2000)
    write_index(index, tmp_path / "i.faiss")
    mapped = read_index(tmp_path / "i.faiss", mmap=True)
    loaded = read_index(tmp_path / "i.faiss", mmap=False)
    d1, i1 = mapped.search(x[:5], 50)
    d2, i2 = loaded.search(x[:5], 50)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_unknown_excluded_ids_are_ignored_and_k_capped() -> None:
    x = _data(n=50)
    idx = _index(x, "Flat")
    res = idx.search(x[0], 500, np.array([1, 2, idx.item_ids[0]]))
    assert len(res.item_ids) == 49 and idx.item_ids[0] not in res.item_ids


def test_bad_query_vectors() -> None:
    x = _data(n=50)
    idx = _index(x, "Flat")
    with pytest.raises(InvalidRequest, match="has 31 values, the index expects 32"):
        idx.search(x[0][:31], 5, np.empty(0, np.int64))
    bad = x[0].copy()
    bad[3] = np.nan
    with pytest.raises(InvalidRequest, match="NaN"):
        idx.search(bad, 5, np.empty(0, np.int64))


def test_user_vector_lookup() -> None:
    x = _data(n=50)
    idx = _index(x, "Flat")
    np.testing.assert_array_equal(idx.user_vector(7), x[0])
    assert idx.user_vector(8) is None


def test_category_allow_list_inside_the_search() -> None:
    x = _data()
    rng = np.random.default_rng(3)
    cats = {"a": rng.random(len(x)) < 0.1, "b": rng.random(len(x)) < 0.05}
    item_ids = np.arange(len(x), dtype=np.int64) + 1
    idx = CandidateIndex(build_index(x, "Flat"), item_ids, np.array([7]), x[:1], {}, cats)
    allowed = cats["a"] | cats["b"]
    excluded = item_ids[allowed][:20]
    res = idx.search(x[0], 100, excluded, ["a", "b"])
    assert len(res.item_ids) == 100
    assert allowed[res.item_ids - 1].all() and not np.isin(res.item_ids, excluded).any()
    # the oracle: exact search restricted to allowed, non-excluded rows
    ok = np.flatnonzero(allowed & ~np.isin(item_ids, excluded))
    want = ok[np.argsort(-(x[ok] @ x[0]), kind="stable")[:100]]
    np.testing.assert_allclose(res.scores, x[want] @ x[0], atol=1e-5)
    with pytest.raises(InvalidRequest, match=r"unknown categories \['c'\]; known: \['a', 'b'\]"):
        idx.search(x[0], 10, np.empty(0, np.int64), ["c"])


def test_category_masks_from_genre_strings() -> None:
    import pandas as pd

    from candidate.sets import category_masks

    m = category_masks(pd.Series(["Drama|War", "Comedy", None, "Drama", "(no genres listed)"]))
    assert sorted(m) == ["(no genres listed)", "Comedy", "Drama", "War"]
    assert m["Drama"].tolist() == [True, False, False, True, False]
    assert m["War"].tolist() == [True, False, False, False, False]


def test_hnsw_coarse_quantizer_is_searched_wide_enough() -> None:
    """With efSearch = nprobe an HNSW quantizer misses good lists (0.88 here); sieve
    gives it 2 x nprobe (0.97)."""
    rng = np.random.default_rng(0)
    c = rng.normal(size=(400, 32))
    x = (c[rng.integers(0, 400, 40_000)] + 0.4 * rng.normal(size=(40_000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index(x, "IVF1024_HNSW8,SQ8", train_size=40_000)
    exact = faiss.IndexFlatIP(32)
    exact.add(x)
    q = x[rng.integers(0, len(x), 50)]
    _, gt = exact.search(q, 500)
    plain = faiss.SearchParametersIVF()
    plain.nprobe = 64
    ours = search_parameters(index, {"nprobe": 64}, 500, None)

    def recall(params: faiss.SearchParameters) -> float:
        _, got = index.search(q, 500, params=params)
        return float(np.mean([len(set(got[i]) & set(gt[i])) / 500 for i in range(len(q))]))

    assert recall(ours) >= 0.95 and recall(ours) > recall(plain) + 0.05


def test_search_many_equals_one_by_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(5000, dtype=np.int64) + 1
    cats = {"a": rng.random(5000) < 0.2}
    idx = CandidateIndex(build_index(x, "Flat"), ids, np.array([1]), x[:1], {}, cats)
    reqs = [
        SearchRequest(x[1], 50, np.empty(0, np.int64)),
        SearchRequest(x[2], 100, rng.choice(ids, 40, replace=False)),
        SearchRequest(x[3], 20, rng.choice(ids, 2000, replace=False)),  # over the slack: alone
        SearchRequest(x[4], 30, np.empty(0, np.int64), ["a"]),  # filtered: alone
        SearchRequest(x[5], 4990, ids[:20]),  # short after filtering: retried alone
    ]
    many = idx.search_many(reqs, exclude_slack=512)
    for r, got in zip(reqs, many, strict=True):
        want = idx.search(r.query, r.k, r.exclude, r.allow)
        np.testing.assert_array_equal(got.item_ids, want.item_ids)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)


def _accelerated_pair(max_k: int) -> tuple[CandidateIndex, CandidateIndex, np.ndarray]:
    """The same catalog served plainly (selectors inside the search) and through an
    index that cannot filter, capped at ``max_k`` results (what a Faiss GPU index
    is). The stand-in is a CPU IndexFlatIP, so this runs without a GPU: what is
    tested is the post-filtering and the fallback, not CUDA."""
    rng = np.random.default_rng(5)
    x = _data(n=6000, seed=5)
    ids = np.arange(6000, dtype=np.int64) * 7 + 3
    cats = {"a": rng.random(6000) < 0.15, "b": rng.random(6000) < 0.05}
    plain = CandidateIndex(build_index(x, "Flat"), ids, np.array([1]), x[:1], {}, cats)
    gpu_like = faiss.IndexFlatIP(x.shape[1])
    gpu_like.add(x)
    fast = CandidateIndex(
        build_index(x, "Flat"),
        ids,
        np.array([1]),
        x[:1],
        {},
        cats,
        accelerated=Accelerated(gpu_like, max_k),
    )
    return plain, fast, x


def test_post_filtered_search_equals_selector_search() -> None:
    plain, fast, x = _accelerated_pair(max_k=2048)
    rng = np.random.default_rng(6)
    ids = plain.item_ids
    # the best rows of query 0, excluded: a post-filter must reach past them
    _, top = plain.index.search(x[:1], 300)
    reqs = [
        SearchRequest(x[0], 1000, ids[top[0]]),
        SearchRequest(x[1], 100, rng.choice(ids, 5000, replace=False)),  # k+e > cap
        SearchRequest(x[2], 50, ids[:10], ["a", "b"]),
        SearchRequest(x[3], 200, np.empty(0, np.int64), ["b"]),  # 5% allowed: falls back
        SearchRequest(x[4], 2048, np.empty(0, np.int64)),
    ]
    for r in reqs:
        want = plain.search(r.query, r.k, r.exclude, r.allow)
        one = fast.search(r.query, r.k, r.exclude, r.allow)
        np.testing.assert_allclose(one.scores, want.scores, atol=1e-5)
        assert len(one.item_ids) == len(want.item_ids) == min(r.k, len(ids))
        assert not np.isin(one.item_ids, r.exclude).any()
    for r, got in zip(reqs, fast.search_many(reqs), strict=True):
        want = plain.search(r.query, r.k, r.exclude, r.allow)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)


def test_post_filter_never_returns_more_than_the_cap_allows() -> None:
    """A cap below k + excluded still answers exactly, through the fallback."""
    plain, fast, x = _accelerated_pair(max_k=120)
    _, top = plain.index.search(x[:1], 50)
    excluded = plain.item_ids[top[0]]
    got = fast.search(x[0], 100, excluded)
    want = plain.search(x[0], 100, excluded)
    np.testing.assert_array_equal(np.sort(got.item_ids), np.sort(want.item_ids))


@pytest.mark.skipif(gpu_count() > 0, reason="this machine has a GPU")
def test_device_gpu_without_a_gpu_is_refused_at_start() -> None:
    from candidate.config import CandidateConfig
    from candidate.sets import use_gpu
    from sieve.errors import ConfigError

    assert use_gpu(CandidateConfig()) is False  # auto: CPU here
    no_gpu_build = "candidate.device is 'gpu' but this Faiss build has no GPU support"
    with pytest.raises(ConfigError, match=no_gpu_build):
        use_gpu(CandidateConfig(device="gpu"))


@pytest.mark.skipif(gpu_count() == 0, reason="needs faiss-gpu and a GPU (unverified in CI)")
def test_gpu_flat_is_exact() -> None:
    plain, _, x = _accelerated_pair(max_k=2048)
    on_gpu = to_gpu(plain.index, x)
    fast = CandidateIndex(
        plain.index, plain.item_ids, np.array([1]), x[:1], {}, None, accelerated=on_gpu
    )
    excluded = plain.item_ids[:500]
    for qi in range(5):
        got = fast.search(x[qi], 1000, excluded)
        want = plain.search(x[qi], 1000, excluded)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
