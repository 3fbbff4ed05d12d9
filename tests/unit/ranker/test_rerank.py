"""The re-rank rules one by one, then the chain; exact small cases and oracles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest

from app.config import load_config
from ranker.diversity import compact_space
from ranker.rerank import (
    AllowCategories,
    Blocklist,
    Fatigue,
    Freshness,
    GroupCap,
    MinGroups,
    Mmr,
    PositionDecay,
    Seen,
    Slate,
    _count_in,
    fatigue,
    freshness,
    group_cap,
    member,
    min_groups,
    mmr,
    position_decay,
    run_chain,
    within_group_rank,
)
from tests.oracles import naive_mmr


def test_within_group_rank() -> None:
    assert within_group_rank(np.array([3, 3, 1, 3, 1, 7])).tolist() == [0, 1, 0, 2, 1, 0]
    assert within_group_rank(np.array([], np.int64)).tolist() == []


def test_group_cap_exact() -> None:
    perm, relaxed = group_cap(np.array([0, 0, 0, 1, 1, 2]), k=4, cap=2)
    assert perm.tolist() == [0, 1, 3, 4, 2, 5] and not relaxed


def test_group_cap_relaxes_instead_of_returning_fewer() -> None:
    perm, relaxed = group_cap(np.array([0, 0, 0, 0, 1]), k=4, cap=2)
    assert relaxed and perm.tolist() == [0, 1, 2, 4, 3]
    perm, relaxed = group_cap(np.array([0, 0]), k=5, cap=1)
    assert relaxed and perm.tolist() == [0, 1]
    assert group_cap(np.array([], np.int64), k=5, cap=1)[0].tolist() == []


@pytest.mark.parametrize("seed", range(5))
def test_group_cap_properties(seed: int) -> None:
    groups = np.random.default_rng(seed).integers(0, 20, 1000)
    perm, relaxed = group_cap(groups, k=50, cap=4)
    assert sorted(perm.tolist()) == list(range(1000)) and not relaxed
    head = perm[:50]
    assert np.bincount(groups[head]).max() <= 4
    assert (np.diff(head) > 0).all()  # the ranked order is kept
    # every item above the last chosen one that was left out has a full group
    for p in np.setdiff1d(np.arange(head[-1]), head):
        assert (groups[head] == groups[p]).sum() == 4


def test_mmr_exact() -> None:
    emb = np.array([[1, 0], [1, 0], [0, 1]], np.float32)  # 0 and 1 are duplicates
    rel = np.array([1.0, 0.9, 0.5], np.float32)
    assert mmr(rel, emb, 3, 0.5).tolist() == [0, 2, 1]
    assert mmr(rel, emb, 3, 1.0).tolist() == [0, 1, 2]  # lambda 1: score order
    assert mmr(rel, emb, 10, 0.5).tolist() == [0, 2, 1]  # k > m: all of them


@pytest.mark.parametrize("lam", [0.3, 0.7, 0.9])
def test_mmr_matches_the_textbook_loop(lam: float) -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(60, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rel = rng.random(60).astype(np.float32)
    assert mmr(rel, emb, 15, lam).tolist() == naive_mmr(rel, emb, 15, lam)


def test_min_groups_exact() -> None:
    perm = min_groups(np.array([0, 0, 0, 0, 1, 2, 0, 3]), k=4, n_groups=3)
    assert perm.tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert min_groups(np.array([0, 1, 0]), k=2, n_groups=2).tolist() == [0, 1, 2]  # already
    assert min_groups(np.array([0, 0, 0]), k=2, n_groups=2).tolist() == [0, 1, 2]  # none to add


def test_position_decay_freshness_fatigue_exact() -> None:
    m = position_decay(np.array([0, 0, 1, 0]), decay=0.5, floor=0.2)
    np.testing.assert_allclose(m, [1.0, 0.6, 1.0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(freshness(np.array([0.0, 2.0, -1.0]), 0.5, 2.0), [1.5, 1.25, 1.5])
    m = fatigue(np.array([True, False, False]), np.array([4.0, 2.0, 0.0]), 0.9, 0.5)
    np.testing.assert_allclose(m, [0.1 * 0.5, 0.75, 1.0], rtol=1e-6)
    assert fatigue(np.zeros(2, bool), np.zeros(2), 0.9, 0.5).tolist() == [1.0, 1.0]


def _slate(n: int = 40, seed: int = 0, **kw) -> tuple[Slate, np.ndarray]:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    genres = np.zeros((n, 3), np.float32)
    primary = rng.integers(0, 3, n)
    genres[np.arange(n), primary] = 1
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    attrs = {"primary_genre": primary, "genres": genres, "age_years": rng.random(n) * 10}
    table = dict(zip(ids.tolist(), primary.tolist(), strict=True))
    slate = Slate(
        ids=ids,
        attributes=attrs,
        embeddings_of=lambda idx: emb[idx],
        attribute_of=lambda item_ids, name: np.array([table[i] for i in item_ids.tolist()]),
        categories={"A": 0, "B": 1, "C": 2},
        **kw,
    )
    return slate, rng.random(n).astype(np.float32)


def test_chain_filters_and_explains_them() -> None:
    slate, scores = _slate(exclude=np.array([100, 101]))
    rules = (Seen(), Blocklist(item_ids=(102,)), AllowCategories(categories=("A", "B")))
    out = run_chain(rules, slate, scores, k=10, explain=True)
    got = slate.ids[out.chosen]
    assert not set(got.tolist()) & {100, 101, 102}
    assert (slate.attributes["primary_genre"][out.chosen] != 2).all()
    want = [i for i in np.argsort(-scores, kind="stable") if slate.ids[i] > 102]
    want = [i for i in want if slate.attributes["primary_genre"][i] != 2][:10]
    assert out.chosen.tolist() == want  # filters only: score order of the rest
    why = {int(slate.ids[i]): (rule, reason) for i, rule, reason in out.dropped}
    assert why[100][0] == "seen" and why[102] == ("blocklist", "on the blocklist")
    dropped_c = {int(slate.ids[i]) for i in np.flatnonzero(slate.attributes["primary_genre"] == 2)}
    assert {i for i, (rule, _) in why.items() if rule == "allow_categories"} == dropped_c - {
        100,
        101,
        102,
    }
    np.testing.assert_array_equal(out.final_scores, scores[out.chosen])  # no score rule ran


def test_chain_score_rules_multiply_and_resort() -> None:
    slate, scores = _slate(recent=np.array([103, 104, 105]))
    rules = (Freshness(boost=1.0, half_life_years=1.0), Fatigue(item_penalty=1.0, group_penalty=0))
    out = run_chain(rules, slate, scores, k=40)
    age = slate.attributes["age_years"]
    want = scores * (1 + 0.5**age)
    want[[3, 4, 5]] = 0.0
    np.testing.assert_allclose(out.final_scores, np.sort(want)[::-1], rtol=1e-6)
    assert set(slate.ids[out.chosen[-3:]].tolist()) == {103, 104, 105}  # shown: last


def test_chain_explain_changes_nothing_and_names_the_rules() -> None:
    slate, scores = _slate(n=300, seed=3, recent=np.array([110]))
    rules = (
        Seen(),
        Freshness(),
        Fatigue(),
        PositionDecay(),
        Mmr(lambda_=0.5, pool=100),
        GroupCap(cap=4),
        MinGroups(n_groups=3),
    )
    plain = run_chain(rules, slate, scores, k=10)
    explained = run_chain(rules, slate, scores, k=10, explain=True)
    assert plain.chosen.tolist() == explained.chosen.tolist()
    assert plain.moved_by == [] and plain.dropped == []
    assert len(explained.moved_by) == 10
    names = {step.split(":")[0] for steps in explained.moved_by for step in steps}
    assert {"mmr", "position_decay"} <= names, names
    # every model top-10 item not returned is accounted for, with a rule
    model_top = set(np.argsort(-scores, kind="stable")[:10].tolist())
    pushed = {i for i, _, _ in explained.dropped}
    assert model_top - set(plain.chosen.tolist()) == pushed
    assert np.bincount(slate.attributes["primary_genre"][plain.chosen]).max() <= 4


def test_mmr_rule_raises_diversity() -> None:
    slate, scores = _slate(n=300, seed=5)
    emb = slate.embeddings_of(np.arange(300))

    def ild(idx: np.ndarray) -> float:
        sim = emb[idx] @ emb[idx].T
        return float((1 - sim[np.triu_indices(len(idx), 1)]).mean())

    base = run_chain((), slate, scores, k=20).chosen
    diverse = run_chain((Mmr(lambda_=0.5),), slate, scores, k=20).chosen
    assert ild(diverse) > ild(base)
    assert len(set(diverse.tolist())) == 20


def test_short_candidate_list_returns_what_there_is() -> None:
    slate, scores = _slate(n=5)
    out = run_chain((Mmr(), GroupCap(cap=1)), slate, scores, k=10)
    assert sorted(out.chosen.tolist()) == [0, 1, 2, 3, 4]
    assert out.notes and out.notes[0].startswith("group_cap_relaxed")


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (
            'rules = [{name = "seen"}, {name = "mmr", lambda = 1.5}]',
            "ranker.rerank.rules.1.mmr.lambda",
        ),
        ('rules = [{name = "seen"}, {name = "diversify"}]', "ranker.rerank.rules.1"),
        ('rules = [{name = "group_cap", capp = 3}]', "ranker.rerank.rules.0.group_cap.capp"),
        ('rules = [{name = "fatigue", item_penalty = -1}]', "rules.0.fatigue.item_penalty"),
        ("history = {ttl_s = 0}", "ranker.rerank.history.ttl_s"),
    ],
)
def test_bad_rule_config_is_refused_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = tmp_path / "sieve.toml"
    path.write_text(f"[ranker.rerank]\n{toml}\n")
    with pytest.raises(pydantic.ValidationError) as e:
        load_config(path)
    assert key in str(e.value)


def test_rule_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "sieve.toml"
    path.write_text(
        '[ranker.rerank]\nrules = [{name = "blocklist", item_ids = [5, 6]},'
        ' {name = "mmr", lambda = 0.4, pool = 50}]\n'
    )
    rules = load_config(path).ranker.rerank.rules
    assert rules == (Blocklist(item_ids=(5, 6)), Mmr(lambda_=0.4, pool=50))


def test_member_agrees_with_isin() -> None:
    rng = np.random.default_rng(2)
    values, pool = rng.integers(0, 500, 1000), np.unique(rng.integers(0, 500, 200))
    np.testing.assert_array_equal(member(values, pool), np.isin(values, pool))
    assert member(values, np.empty(0, np.int64)).sum() == 0


def test_count_in_small_codes_and_any_values() -> None:
    sample = np.array([3, 3, 0, 7])
    assert _count_in(np.array([3, 0, 5, 7, -1]), sample).tolist() == [2, 1, 0, 1, 0]
    big = np.array([10**9, 10**9, -4])
    assert _count_in(np.array([10**9, -4, 2]), big).tolist() == [2, 1, 0]
    assert _count_in(np.array([1, 2]), np.empty(0, np.int64)).tolist() == [0, 0]


@pytest.mark.parametrize(("m", "k"), [(40, 15), (200, 15)])  # both inner paths
def test_mmr_paths_agree_with_the_textbook_loop(m: int, k: int) -> None:
    rng = np.random.default_rng(m)
    emb = rng.normal(size=(m, 8)).astype(np.float32)  # some negative cosines
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rel = rng.random(m).astype(np.float32)
    assert mmr(rel, emb, k, 0.6).tolist() == naive_mmr(rel, emb, k, 0.6)


@pytest.mark.parametrize(("m", "k", "lam"), [(40, 15, 0.6), (200, 15, 0.6), (60, 20, 0.3)])
def test_mean_penalty_mmr_matches_the_textbook_loop(m: int, k: int, lam: float) -> None:
    rng = np.random.default_rng(m + k)
    emb = rng.normal(size=(m, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rel = rng.random(m).astype(np.float32)
    assert mmr(rel, emb, k, lam, "mean").tolist() == naive_mmr(rel, emb, k, lam, "mean")


def test_mean_penalty_raises_mean_pairwise_distance_more_than_max() -> None:
    """On clustered embeddings, at equal lambda, the mean penalty (the greedy for
    the mean pairwise distance) leaves a list at least as spread as the max one."""
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(8, 16))
    emb = (centers[rng.integers(0, 8, 300)] + 0.5 * rng.normal(size=(300, 16))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rel = rng.random(300).astype(np.float32)

    def spread(idx: np.ndarray) -> float:
        sim = emb[idx] @ emb[idx].T
        return float((1 - sim[np.triu_indices(len(idx), 1)]).mean())

    top = np.argsort(-rel)[:30]
    by_max, by_mean = mmr(rel, emb, 30, 0.5, "max"), mmr(rel, emb, 30, 0.5, "mean")
    assert spread(by_mean) >= spread(by_max) > spread(top)


def _ild(vectors: np.ndarray) -> float:
    sim = vectors @ vectors.T
    return float((1.0 - sim[np.triu_indices(len(vectors), 1)]).mean())


def test_compact_space_keeps_the_diversity_mmr_finds_in_the_full_space() -> None:
    # 384-d items in 24 topics, relevance that favours a few topics: MMR on the
    # 32-d compact space must find lists about as diverse, measured in the full
    # space, as MMR on the full vectors, and far more diverse than score order.
    rng = np.random.default_rng(3)
    topics = rng.standard_normal((24, 384)).astype(np.float32)
    topic = rng.integers(0, 24, 3000)
    emb = topics[topic] + 0.8 * rng.standard_normal((3000, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[7] = 0.0  # an item the catalog lacks embeddings for
    compact = compact_space(emb, 32)
    assert compact.shape == (3000, 32) and compact.dtype == np.float32
    norms = np.linalg.norm(compact, axis=1)
    assert norms[7] == 0.0
    assert np.allclose(np.delete(norms, 7), 1.0, atol=1e-5)
    assert np.array_equal(compact, compact_space(emb, 32))  # seeded: every load agrees
    gains = []
    for trial in range(20):
        # a pool crowded by one topic that the scores favour, beside two others and
        # some of everything: score order is one topic, MMR must reach the rest
        a, b, c = rng.choice(24, 3, replace=False)
        by_topic = [rng.choice(np.flatnonzero(topic == t), n, replace=False) for t, n in
                    ((a, 80), (b, 40), (c, 40))]  # fmt: skip
        rest = rng.choice(np.flatnonzero(~np.isin(topic, [a, b, c])), 40, replace=False)
        pool = np.setdiff1d(np.concatenate([*by_topic, rest]), [7])
        rel = np.where(topic[pool] == a, 1.0, 0.5) + 0.1 * rng.random(len(pool))
        by_score = np.argsort(-rel)[:50]
        full = mmr(rel, emb[pool], 50, 0.5)
        small = mmr(rel, compact[pool], 50, 0.5)
        d_full, d_small = _ild(emb[pool][full]), _ild(emb[pool][small])
        assert d_small >= 0.97 * d_full, (trial, d_small, d_full)
        gains.append(d_small - _ild(emb[pool][by_score]))
    assert min(gains) > 0.2, gains


@pytest.mark.parametrize("dims", [0, 384, -1])
def test_compact_space_refuses_a_dimension_it_cannot_give(dims: int) -> None:
    with pytest.raises(ValueError, match="dims must be in 1..383"):
        compact_space(np.ones((10, 384), np.float32), dims)
