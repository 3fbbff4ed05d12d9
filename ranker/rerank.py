"""The re-rank stage: a chain of rules, from config, over the scored candidates.

Each rule is a small pure function over numpy arrays (below, one per rule, each
tested on its own) and a params model that validates its config; ``AnyRule`` (a
union discriminated by ``name``) maps the config name to the model. A new rule is
one function, one ``Rule`` subclass and one member of ``AnyRule``.

Rules come in three kinds, and the chain runs them in config order over one
ranking (positions of the candidates, best first) and one score per candidate:

- **filter**: drops items (seen, blocklist, allow_categories);
- **score**: multiplies scores, then the ranking is re-sorted by them
  (freshness, fatigue, position_decay);
- **order**: moves items without changing scores (mmr, group_cap, min_groups).

So a score rule after an order rule re-sorts away the order rule's work: put the
order rules last. With ``explain`` the chain also records, for each rule, every
item's position and score, and says for each returned item which rules moved it
and for each dropped item why; without it none of this is computed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sieve.ids import member

# -------------------------------------------------------------- pure functions --


def within_group_rank(groups: np.ndarray) -> np.ndarray:
    """For items in ranked order: 0 for the first item of each group, 1 for the
    second, and so on. int64 [n]."""
    g = np.asarray(groups)
    n = len(g)
    if n == 0:
        return np.empty(0, np.int64)
    by_group = np.argsort(g, kind="stable")
    gs = g[by_group]
    first = np.empty(n, bool)  # first of its group in the sorted order
    first[0] = True
    np.not_equal(gs[1:], gs[:-1], out=first[1:])
    at = np.arange(n)
    out = np.empty(n, np.int64)
    out[by_group] = at - np.maximum.accumulate(np.where(first, at, 0))
    return out


def mmr(
    relevance: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    lam: float,
    penalty: Literal["max", "mean"] = "max",
) -> np.ndarray:
    """Greedy maximal marginal relevance (Carbonell and Goldstein, 1998).

    Picks ``k`` of ``m`` items one at a time, each maximising
    ``lam * relevance - (1 - lam) * similarity to the items already picked``,
    where the similarity is the largest cosine (``penalty="max"``, the original;
    negative cosines count as 0) or the mean cosine (``"mean"``: the greedy for
    max-sum diversification, whose objective is the list's mean pairwise
    distance itself). Vectorised: the cosines come from one m x m matrix product
    when m <= 4k, else from one matrix-vector product per pick (O(k m d)); each
    pick is then three numpy calls on m values.

    ``relevance``: float [m], higher is better (the chain scales it to [0, 1]);
    ``embeddings``: float32 [m, d], L2-normalised rows; ``k``: items to pick;
    ``lam``: 1 is pure relevance, 0 pure novelty. Returns indices into the
    inputs, in pick order, length min(k, m).
    """
    rel = np.asarray(relevance, np.float32)
    m = len(rel)
    k = min(k, m)
    if lam >= 1.0:
        return np.argsort(-rel, kind="stable")[:k]
    emb = np.asarray(embeddings, np.float32)
    base = np.float32(lam) * rel
    c = np.float32(lam - 1.0)
    if penalty == "mean":
        return _mmr_mean(base, c, emb, k)
    # objective[j] = base[j] + c * max(0, max cosine of j to the picked) is the
    # running minimum of base + c * cos(i, .) over picked i (c < 0), started at base.
    if m <= 4 * k:  # one matrix product beats k matrix-vector ones (3x the flop rate)
        table = emb @ emb.T
        table *= c
        table += base

        def row(i: int) -> np.ndarray:
            return table[i]
    else:
        scaled = emb * c

        def row(i: int) -> np.ndarray:
            r = scaled @ emb[i]
            r += base
            return r

    picked = np.empty(k, np.int64)
    objective = base.copy()
    for t in range(k):
        i = int(objective.argmax())  # the first of equals, as a loop would pick
        picked[t] = i
        np.minimum(objective, row(i), out=objective)
        objective[i] = -np.inf
    return picked


def _mmr_mean(base: np.ndarray, c: np.float32, emb: np.ndarray, k: int) -> np.ndarray:
    """``mmr`` with the mean cosine to the picked items as the penalty:
    objective = base + c * (sum of cosines) / (items picked)."""
    m = len(base)
    table = emb @ emb.T if m <= 4 * k else None
    picked = np.empty(k, np.int64)
    total = np.zeros(m, np.float32)
    taken = np.zeros(m, bool)
    objective = base.copy()
    for t in range(k):
        i = int(objective.argmax())  # the first of equals, as a loop would pick
        picked[t] = i
        taken[i] = True
        total += table[i] if table is not None else emb @ emb[i]
        np.multiply(total, c / np.float32(t + 1), out=objective)
        objective += base
        objective[taken] = -np.inf
    return picked


def _count_in(values: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """For each of ``values``, how often it occurs in ``sample`` (int64 [n])."""
    if len(sample) == 0:
        return np.zeros(len(values), np.int64)
    if sample.dtype.kind in "iu" and values.dtype.kind in "iu" and sample.min() >= 0:
        top = max(int(sample.max()), int(values.max(initial=0))) + 1
        if top <= 1 << 16:  # small codes (genres): a table lookup
            return np.bincount(sample, minlength=top)[np.maximum(values, 0)] * (values >= 0)
    uniq, counts = np.unique(sample, return_counts=True)
    pos = np.minimum(np.searchsorted(uniq, values), len(uniq) - 1)
    return np.where(uniq[pos] == values, counts[pos], 0)


def _rest(n: int, head: np.ndarray) -> np.ndarray:
    """Positions 0..n-1 not in ``head``, in order."""
    mask = np.ones(n, bool)
    mask[head] = False
    return np.flatnonzero(mask)


def group_cap(groups: np.ndarray, k: int, cap: int) -> tuple[np.ndarray, bool]:
    """Re-order a ranked list so its first ``k`` hold at most ``cap`` items per group.

    Items over the cap move below the first k, keeping their order; when the cap
    leaves fewer than k items, the best capped-out ones fill the rest (the cap is
    relaxed rather than returning fewer items).

    Args:
        groups: group of each item, in ranked order.

    Returns:
        (a permutation of positions, whether the cap had to be relaxed).
    """
    n = len(groups)
    within = within_group_rank(groups)
    ok = np.flatnonzero(within < cap)
    over = np.flatnonzero(within >= cap)
    head = ok[:k]
    relaxed = len(head) < min(k, n)
    if relaxed:
        head = np.sort(np.concatenate([head, over[: min(k, n) - len(head)]]))
    return np.concatenate([head, _rest(n, head)]), relaxed


def min_groups(groups: np.ndarray, k: int, n_groups: int) -> np.ndarray:
    """Re-order a ranked list so its first ``k`` hold at least ``n_groups`` distinct
    groups, where the list has them.

    The best item of each group missing from the first k (best group first) takes
    the place of the lowest-placed item there whose group appears more than once.

    Returns:
        A permutation of positions: the new first k in ranked order, then the rest.
    """
    g = np.asarray(groups)
    n = len(g)
    k = min(k, n)
    head = list(range(k))
    counts: dict[int, int] = {}
    for x in g[:k].tolist():
        counts[x] = counts.get(x, 0) + 1
    missing = n_groups - len(counts)
    if missing <= 0 or k == 0:
        return np.arange(n)
    _, first = np.unique(g[k:], return_index=True)
    newcomers = [k + int(p) for p in np.sort(first) if int(g[k + p]) not in counts][:missing]
    for p in newcomers:
        j = next((j for j in range(k - 1, -1, -1) if counts[int(g[head[j]])] > 1), None)
        if j is None:
            break
        counts[int(g[head[j]])] -= 1
        counts[int(g[p])] = 1
        head[j] = p
    top = np.sort(np.asarray(head, np.int64))
    return np.concatenate([top, _rest(n, top)])


def position_decay(groups: np.ndarray, decay: float, floor: float) -> np.ndarray:
    """Multipliers that discount repeats of a group down a ranked list: the r-th
    item of a group (r = 0 for its first) gets ``(1 - floor) * decay**r + floor``,
    X's author-diversity discount. float32 [n]."""
    r = within_group_rank(groups)
    if len(r) == 0:
        return np.ones(0, np.float32)
    table = (1.0 - floor) * np.power(decay, np.arange(int(r.max()) + 1)) + floor
    return table.astype(np.float32)[r]


def freshness(age_years: np.ndarray, boost: float, half_life_years: float) -> np.ndarray:
    """Multipliers ``1 + boost * 0.5 ** (age / half_life)``: a new item gets
    ``1 + boost``, one a half-life old ``1 + boost / 2``. float32 [n]."""
    age = np.maximum(np.asarray(age_years, np.float32), 0.0)
    return (1.0 + boost * np.exp2(age * np.float32(-1.0 / half_life_years))).astype(np.float32)


def fatigue(
    shown: np.ndarray, group_shown: np.ndarray, item_penalty: float, group_penalty: float
) -> np.ndarray:
    """Multipliers for items and groups the user was shown recently.

    Args:
        shown: bool [n], the item itself was shown.
        group_shown: float [n], how many recently shown items share the item's group.
        item_penalty: score cut for a shown item (1 sends it to the bottom).
        group_penalty: score cut for the most-shown group; other groups in
            proportion to their count.
    """
    most = float(np.max(group_shown)) if len(group_shown) else 0.0
    share = np.asarray(group_shown, np.float32) / most if most > 0 else np.zeros(len(shown))
    m = (1.0 - item_penalty * np.asarray(shown, np.float32)) * (1.0 - group_penalty * share)
    return m.astype(np.float32)


# ----------------------------------------------------------------------- chain --


@dataclass(frozen=True)
class Slate:
    """What the rules may read about the n candidates of one request.

    ``attributes`` are the item table's columns for the candidates (e.g.
    ``primary_genre`` int [n], ``genres`` float [n, G], ``age_years`` float [n]);
    ``attribute_of`` gives one column for any item ids (recently shown items are
    not always candidates); ``embeddings_of`` gives candidate embeddings by
    candidate index.
    """

    ids: np.ndarray
    attributes: Mapping[str, np.ndarray]
    embeddings_of: Callable[[np.ndarray], np.ndarray]
    attribute_of: Callable[[np.ndarray, str], np.ndarray]
    exclude: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # ascending
    recent: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    categories: Mapping[str, int] = field(default_factory=dict)  # name -> genres column


class Rule(BaseModel):
    """A rule's config; ``apply`` adapts the chain's state to its pure function."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    name: str
    kind: ClassVar[Literal["filter", "score", "order"]]
    attributes: ClassVar[tuple[str, ...]] = ()
    """Item table columns the rule reads (checked when the ranker loads a set)."""
    reads_order: ClassVar[bool] = True
    """score rules: whether the multipliers depend on the ranking (if not, the
    chain sorts once after a run of such rules)."""

    def keep(self, slate: Slate, idx: np.ndarray) -> np.ndarray:
        """filter: bool mask over candidates ``idx``."""
        raise NotImplementedError

    def why(self) -> str:
        """filter: the reason a dropped item is given."""
        raise NotImplementedError

    def multipliers(self, slate: Slate, idx: np.ndarray, score: np.ndarray) -> np.ndarray:
        """score: multipliers for candidates ``idx`` (in ranked order)."""
        raise NotImplementedError

    def reorder(
        self, slate: Slate, idx: np.ndarray, score: np.ndarray, k: int
    ) -> tuple[np.ndarray, str]:
        """order: (a permutation of positions of ``idx``, in ranked order; a note
        for the response, or "")."""
        raise NotImplementedError

    def group_attribute(self) -> str | None:
        return None


class Seen(Rule):
    """Drop the user's seen items and the caller's exclusions (retrieval already
    leaves them out; this catches any other candidate source)."""

    name: Literal["seen"] = "seen"
    kind = "filter"

    def keep(self, slate: Slate, idx: np.ndarray) -> np.ndarray:
        return ~member(slate.ids[idx], slate.exclude)

    def why(self) -> str:
        return "seen or excluded by the caller"


class Blocklist(Rule):
    """Drop the listed item ids (e.g. withdrawn titles)."""

    name: Literal["blocklist"] = "blocklist"
    kind = "filter"
    item_ids: tuple[Annotated[int, Field(gt=0)], ...] = ()

    def keep(self, slate: Slate, idx: np.ndarray) -> np.ndarray:
        return ~member(slate.ids[idx], self._sorted)

    @functools.cached_property
    def _sorted(self) -> np.ndarray:
        return np.unique(np.asarray(self.item_ids, np.int64))

    def why(self) -> str:
        return "on the blocklist"


class AllowCategories(Rule):
    """Keep only items of at least one listed category (the catalog's genres);
    empty keeps everything."""

    name: Literal["allow_categories"] = "allow_categories"
    kind = "filter"
    attributes = ("genres",)
    categories: tuple[str, ...] = ()

    def keep(self, slate: Slate, idx: np.ndarray) -> np.ndarray:
        if not self.categories:
            return np.ones(len(idx), bool)
        genres = slate.attributes["genres"]
        wanted = np.zeros(genres.shape[1], genres.dtype)
        wanted[[slate.categories[c] for c in self.categories if c in slate.categories]] = 1
        return np.asarray(genres[idx] @ wanted > 0)

    def why(self) -> str:
        return f"not in the allowed categories {list(self.categories)}"


class Freshness(Rule):
    """Boost new items: score x (1 + boost * 0.5 ** (age / half_life_years))."""

    name: Literal["freshness"] = "freshness"
    kind = "score"
    reads_order = False
    attributes = ("age_years",)
    boost: float = Field(0.1, ge=0.0, le=10.0)
    half_life_years: float = Field(2.0, gt=0.0, le=100.0)

    def multipliers(self, slate: Slate, idx: np.ndarray, score: np.ndarray) -> np.ndarray:
        return freshness(slate.attributes["age_years"][idx], self.boost, self.half_life_years)


class Fatigue(Rule):
    """Demote items, and groups, shown to the user recently (across requests: the
    ranker records what it returns in its shown-history store)."""

    name: Literal["fatigue"] = "fatigue"
    kind = "score"
    reads_order = False
    item_penalty: float = Field(0.9, ge=0.0, le=1.0)
    group_penalty: float = Field(0.3, ge=0.0, le=1.0)
    attribute: str = "primary_genre"

    def multipliers(self, slate: Slate, idx: np.ndarray, score: np.ndarray) -> np.ndarray:
        if len(slate.recent) == 0:
            return np.ones(len(idx), np.float32)
        shown = member(slate.ids[idx], np.sort(slate.recent))
        recent_groups = slate.attribute_of(slate.recent, self.attribute)
        groups = slate.attributes[self.attribute][idx]
        return fatigue(
            shown, _count_in(groups, recent_groups), self.item_penalty, self.group_penalty
        )

    def group_attribute(self) -> str:
        return self.attribute


class PositionDecay(Rule):
    """Discount repeats of a group down the list: the r-th item of a group gets
    score x ((1 - floor) * decay**r + floor)."""

    name: Literal["position_decay"] = "position_decay"
    kind = "score"
    decay: float = Field(0.8, gt=0.0, le=1.0)
    floor: float = Field(0.2, ge=0.0, le=1.0)
    attribute: str = "primary_genre"

    def multipliers(self, slate: Slate, idx: np.ndarray, score: np.ndarray) -> np.ndarray:
        return position_decay(slate.attributes[self.attribute][idx], self.decay, self.floor)

    def group_attribute(self) -> str:
        return self.attribute


class Mmr(Rule):
    """Maximal marginal relevance over item embeddings (the ranker gives the text
    embeddings: content, not co-consumption) among the best ``pool`` items:
    lambda 1 is score order, lower trades score for novelty."""

    name: Literal["mmr"] = "mmr"
    kind = "order"
    lambda_: float = Field(0.7, ge=0.0, le=1.0, alias="lambda")
    pool: int = Field(200, ge=1, le=2048)
    """Only the best ``pool`` items compete (bounds the cost: O(k pool d))."""
    penalty: Literal["max", "mean"] = "max"
    """Similarity to the picked items: the largest cosine (MMR as published) or
    the mean (max-sum diversification: the list's mean pairwise distance)."""

    def reorder(
        self, slate: Slate, idx: np.ndarray, score: np.ndarray, k: int
    ) -> tuple[np.ndarray, str]:
        m = min(len(idx), max(self.pool, k))
        s = score[idx[:m]]
        span = float(s.max() - s.min()) if m else 0.0
        rel = (s - s.min()) / span if span > 0 else np.ones(m, np.float32)
        picked = mmr(rel, slate.embeddings_of(idx[:m]), k, self.lambda_, self.penalty)
        return np.concatenate([picked, _rest(len(idx), picked)]), ""


class GroupCap(Rule):
    """At most ``cap`` items of one group in the first k (relaxed, and said so in
    the response, when the candidates cannot fill k otherwise)."""

    name: Literal["group_cap"] = "group_cap"
    kind = "order"
    cap: int = Field(10, ge=1)
    attribute: str = "primary_genre"

    def reorder(
        self, slate: Slate, idx: np.ndarray, score: np.ndarray, k: int
    ) -> tuple[np.ndarray, str]:
        perm, relaxed = group_cap(slate.attributes[self.attribute][idx], k, self.cap)
        note = f"group_cap_relaxed: fewer than {k} items within {self.cap} per group"
        return perm, note if relaxed else ""

    def group_attribute(self) -> str:
        return self.attribute


class MinGroups(Rule):
    """At least ``n_groups`` distinct groups in the first k, where the candidates
    have them."""

    name: Literal["min_groups"] = "min_groups"
    kind = "order"
    n_groups: int = Field(5, ge=1, le=500)
    attribute: str = "primary_genre"

    def reorder(
        self, slate: Slate, idx: np.ndarray, score: np.ndarray, k: int
    ) -> tuple[np.ndarray, str]:
        return min_groups(slate.attributes[self.attribute][idx], k, self.n_groups), ""

    def group_attribute(self) -> str:
        return self.attribute


AnyRule = Annotated[
    Seen
    | Blocklist
    | AllowCategories
    | Freshness
    | Fatigue
    | PositionDecay
    | Mmr
    | GroupCap
    | MinGroups,
    Field(discriminator="name"),
]
"""A rule as config names it (pydantic picks the model by ``name``)."""


@dataclass
class Outcome:
    """The chain's answer: ``chosen`` candidate indices, best first, with their
    final scores; notes for the response's degradations; with ``explain``, per
    chosen item the rules that moved it, and dropped items with the reason."""

    chosen: np.ndarray
    final_scores: np.ndarray
    notes: list[str] = field(default_factory=list)
    moved_by: list[list[str]] = field(default_factory=list)
    dropped: list[tuple[int, str, str]] = field(default_factory=list)  # (index, rule, why)


def run_chain(
    rules: tuple[Rule, ...], slate: Slate, scores: np.ndarray, k: int, explain: bool = False
) -> Outcome:
    """Run ``rules`` in order over the candidates scored ``scores``; keep ``k``.

    ``final_scores`` are the scores after the score rules; the order is the
    chain's, so order rules can place an item above one with a higher score.
    """
    score = np.asarray(scores, np.float32).copy()
    order = np.argsort(-score, kind="stable")
    unsorted = False  # a score rule changed scores and the ranking is not re-sorted yet
    notes: list[str] = []
    trail: list[tuple[str, np.ndarray, np.ndarray]] = []  # (rule, rank [n], score [n])
    filtered: dict[int, tuple[str, str]] = {}
    if explain:
        trail.append(("model", _ranks(order, len(score)), score.copy()))
    for rule in rules:
        if unsorted and (rule.kind == "order" or rule.reads_order):
            order, unsorted = order[np.argsort(-score[order], kind="stable")], False
        if rule.kind == "filter":
            keep = rule.keep(slate, order)
            if explain:
                for i in order[~keep].tolist():
                    filtered[i] = (rule.name, rule.why())
            order = order[keep]
        elif rule.kind == "score":
            score[order] *= rule.multipliers(slate, order, score)
            unsorted = True
            if explain:
                order, unsorted = order[np.argsort(-score[order], kind="stable")], False
        else:
            perm, note = rule.reorder(slate, order, score, k)
            order = order[perm]
            if note:
                notes.append(note)
        if explain:
            trail.append((rule.name, _ranks(order, len(score)), score.copy()))
    if unsorted:
        order = order[np.argsort(-score[order], kind="stable")]
    chosen = order[:k]
    out = Outcome(chosen, score[chosen], notes)
    if explain:
        out.moved_by = [_moves(trail, int(i)) for i in chosen]
        out.dropped = _dropped(trail, filtered, chosen, k)
    return out


def _ranks(order: np.ndarray, n: int) -> np.ndarray:
    """Position of each candidate in ``order``; -1 for candidates not in it."""
    r = np.full(n, -1, np.int64)
    r[order] = np.arange(len(order))
    return r


def _moves(trail: list[tuple[str, np.ndarray, np.ndarray]], i: int) -> list[str]:
    """What each rule did to candidate ``i``: '<rule>: #a -> #b[, score x -> y]'."""
    out = []
    for (_, r0, s0), (name, r1, s1) in zip(trail, trail[1:], strict=False):
        if r0[i] != r1[i] or s0[i] != s1[i]:
            step = f"{name}: #{r0[i] + 1} -> #{r1[i] + 1}"
            if s0[i] != s1[i]:
                step += f", score {s0[i]:.4f} -> {s1[i]:.4f}"
            out.append(step)
    return out


def _dropped(
    trail: list[tuple[str, np.ndarray, np.ndarray]],
    filtered: dict[int, tuple[str, str]],
    chosen: np.ndarray,
    k: int,
) -> list[tuple[int, str, str]]:
    """Every filtered candidate, and every candidate of the model's own top k that
    the rules pushed out, with the last rule that took it out of the top k."""
    out = [(i, rule, why) for i, (rule, why) in filtered.items()]
    final = set(chosen.tolist())
    model_top = np.flatnonzero((trail[0][1] >= 0) & (trail[0][1] < k))
    for i in model_top[np.argsort(trail[0][1][model_top])].tolist():
        if i in final or i in filtered:
            continue
        exits = [
            (name, f"moved from #{r0[i] + 1} to #{r1[i] + 1}")
            for (_, r0, _), (name, r1, _) in zip(trail, trail[1:], strict=False)
            if 0 <= r0[i] < k <= r1[i]
        ]
        if exits:
            out.append((i, *exits[-1]))
    return out


def item_attributes(rules: tuple[Rule, ...]) -> list[tuple[int, str, bool]]:
    """(position in the chain, item attribute, whether the rule groups items by
    it, so it needs one value per item) for every attribute a rule reads."""
    out = [(i, a, False) for i, r in enumerate(rules) for a in r.attributes]
    return out + [(i, a, True) for i, r in enumerate(rules) if (a := r.group_attribute())]
