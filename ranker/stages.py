"""The funnel's stages after retrieval, one function each, over one request's
``RankContext`` and the ``LoadedSet`` it took. ``ranker/pipeline.py`` calls them
in order; the CPU-only ones run on the ranker's CPU thread.

    user_features   online store (breaker, retries, deadline), else the user cache
    request_vector  the user tower over the user's last items, else the stored vector
    candidate_rows  every source's candidates merged, their item-table rows, model inputs
    score_here      the model on this thread (or ``score_batched``: across requests)
    rerank          the rule chain over the scored candidates -> the answer
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

import numpy as np
from redis.asyncio.retry import Retry

from features.reader import FeatureFrame
from protos.sieve.v1 import sieve_pb2
from ranker import ladder
from ranker.config import ReliabilityConfig
from ranker.context import RankContext, RankResult
from ranker.features import ITEM_INPUTS, USER_INPUTS, assemble, source_inputs
from ranker.loaded import LoadedSet
from ranker.rerank import AnyRule, Slate, run_chain
from ranker.resilience import Breaker, TtlCache
from ranker.scorer import OnnxScorer, replace_nonfinite
from ranker.sources import Candidates, i2i_scores, merge
from sieve.batcher import MicroBatcher, per_group
from sieve.data import GENRE_INDEX

log = logging.getLogger(__name__)


class Rows(NamedTuple):
    """A request's candidates as the model sees them."""

    ids: np.ndarray  # int64
    scores: np.ndarray  # learned scores (user vector . item vector), float32
    ranks: np.ndarray  # ranks in the learned ANN's list (-1: another source's item)
    rows: np.ndarray  # rows of the item table
    x: np.ndarray  # model inputs [n, MODEL_FEATURES]
    n_bad: int  # non-finite inputs replaced by defaults
    sources: np.ndarray  # uint8 source bits (ranker/sources.py)
    i2i: np.ndarray  # float32 item-to-item scores (0: no seed reaches the item)


async def user_features(
    state: LoadedSet,
    ctx: RankContext,
    breaker: Breaker,
    retry: Retry,
    cache: TtlCache[int, FeatureFrame],
) -> FeatureFrame | None:
    """The user's features from the online store (behind ``breaker``, idempotent
    reads retried with backoff and jitter, all within the stage's deadline); when
    that fails, the copy the last good read left in ``cache`` (the
    ``cached_user_features`` rung), else None. Records what went wrong in ``ctx``.
    """
    user_id = ctx.query.user_id
    ids = np.array([user_id], np.int64)
    left = ctx.deadlines.left("user_features")
    if left <= 0:  # the caller's deadline leaves no time: not the store's fault
        why = "user_features_failed: no time left"
    elif breaker.allow():
        try:
            async with asyncio.timeout(left):
                user = await retry.call_with_retry(
                    lambda: state.reader.read(state.user_view, ids), lambda _: None
                )
        except Exception as e:  # noqa: BLE001 - a failed store read degrades
            breaker.failure()
            log.warning("user features failed: %s: %s", type(e).__name__, e)
            why = f"user_features_failed: {ladder.failure(e)}"
        else:
            breaker.success()
            if user.found[0]:
                cache.put(user_id, user)
            return user
    else:
        why = "user_features_failed: online_store breaker open"
    cached = cache.get(user_id)
    if cached is None:
        ctx.note(why)
    else:
        ctx.take("cached_user_features", why + "; served the last read features")
    return cached


def request_vector(state: LoadedSet, ctx: RankContext, user: FeatureFrame) -> np.ndarray:
    """The user's learned vector by the user tower over their last items, at request
    time; the stored vector (the ``stored_user_vector`` rung) when the user has no
    recent items the catalog knows or the tower fails."""
    stored = user.array("user_vector")[0]
    rows = state.rows_of(user.lists("recent_item_ids")[0])
    if len(rows) == 0:
        return stored
    try:
        return state.user_tower.vector(state.embeddings[rows])
    except Exception as e:  # noqa: BLE001 - the stored vector beats a failed Rank
        log.warning("user tower failed: %s: %s", type(e).__name__, e)
        ctx.take("stored_user_vector", f"user_tower_failed: {ladder.failure(e)}")
        return stored


def candidate_rows(
    state: LoadedSet,
    ctx: RankContext,
    learned: sieve_pb2.RetrieveResponse,
    text: sieve_pb2.SpaceResult | None,
    exclude: np.ndarray,
    vector: np.ndarray,
    user: FeatureFrame,
    rel: ReliabilityConfig,
) -> Rows:
    """Every source's candidates merged (``ranker/sources.py``), cut to the best by
    learned score when retrieval ran late (``fewer_candidates``), with their
    item-table rows and model inputs (CPU only)."""
    recent = state.rows_of(user.lists("recent_item_ids")[0])
    i2i = i2i_scores(state.neighbour_rows, state.neighbour_scores, recent, state.catalog.ids)
    cand = merge(
        np.asarray(learned.item_ids, np.int64),
        np.asarray(text.item_ids, np.int64) if text is not None else np.empty(0, np.int64),
        i2i,
        state.popular_ids,
        exclude,
        state.quotas,
    )
    cat_rows, in_catalog = state.catalog.rows(cand.ids)
    vectors = np.take(state.embeddings, cat_rows, axis=0)
    vectors[~in_catalog] = 0.0
    left = ctx.deadlines.left("score")
    if ladder.fewer_candidates(left, rel, len(cand.ids)):
        n_keep = rel.degraded_candidates
        ctx.out_of_time = True
        keep = np.sort(np.argsort(-(vectors @ vector), kind="stable")[:n_keep])
        ctx.take(
            "fewer_candidates",
            f"fewer_candidates: {left * 1e3:.1f} ms left for item features and scoring; "
            f"scored the top {n_keep} of {len(cand.ids)} candidates by learned score",
        )
        cand = Candidates(*(a[keep] for a in cand))
        cat_rows, in_catalog, vectors = cat_rows[keep], in_catalog[keep], vectors[keep]
    rows, found = state.items.rows(cand.ids)
    found &= in_catalog
    if not found.all():
        ctx.note(f"missing_item_features: {int((~found).sum())} candidates dropped")
        cand = Candidates(*(a[found] for a in cand))
        rows, cat_rows, vectors = rows[found], cat_rows[found], vectors[found]
    scores, extra = source_inputs(
        cand.sources,
        cand.i2i_score,
        vectors,
        vector,
        np.take(state.text_embeddings, cat_rows, axis=0),
        user.array("text_vector")[0],
        state.embeddings[recent],
    )
    x = assemble(
        scores,
        cand.learned_rank,
        {name: user.array(name) for name in USER_INPUTS},
        state.items.take(ITEM_INPUTS, rows),
        extra,
    )
    n_bad = replace_nonfinite(x, state.feature_defaults)
    if n_bad:
        ctx.note(f"nonfinite_features: {n_bad} values scored with defaults")
    return Rows(cand.ids, scores, cand.learned_rank, rows, x, n_bad, cand.sources, cand.i2i_score)


def score_here(
    state: LoadedSet, ctx: RankContext, x: np.ndarray, rel: ReliabilityConfig
) -> np.ndarray | None:
    """Model scores of the rows ``x`` by a model call on this thread, or None (the
    ``ann_order`` rung, recorded in ``ctx``): no time to score, or the model failed."""
    why = ladder.no_time_to_score(ctx.deadlines.left("score"), rel)
    ctx.out_of_time |= bool(why)
    if not why:
        try:
            return state.scorer.score(x)
        except Exception as e:  # noqa: BLE001 - ANN order beats a failed Rank
            why = ladder.scoring_failed(e)
    ctx.take("ann_order", why)
    return None


async def score_batched(
    batcher: MicroBatcher[tuple[OnnxScorer, np.ndarray], np.ndarray],
    state: LoadedSet,
    ctx: RankContext,
    x: np.ndarray,
    rel: ReliabilityConfig,
) -> np.ndarray | None:
    """``score_here`` through the batcher, which scores the rows of concurrent
    requests in one model call; also None when its queue is full or its wait ran
    out."""
    left = ctx.deadlines.left("score")
    why = ladder.no_time_to_score(left, rel)
    ctx.out_of_time |= bool(why)
    if not why:
        try:
            async with asyncio.timeout(left):
                return await batcher.submit((state.scorer, x))
        except TimeoutError:
            why, ctx.out_of_time = (
                f"ann_order: {left * 1e3:.1f} ms left to score, spent waiting",
                True,
            )
        except Exception as e:  # noqa: BLE001 - ANN order beats a failed Rank
            why = ladder.scoring_failed(e)
    ctx.take("ann_order", why)
    return None


def score_batch(items: list[tuple[OnnxScorer, np.ndarray]]) -> list[np.ndarray]:
    """Score the rows of several requests with one model call per scorer.

    Rows are grouped by scorer, so requests that started before a model swap are
    never scored by the new model (or the reverse).
    """

    def one_call(scorer: OnnxScorer, blocks: list[np.ndarray]) -> list[np.ndarray]:
        scores = scorer.score(np.concatenate(blocks))
        return np.split(scores, np.cumsum([len(b) for b in blocks])[:-1])

    return per_group(items, one_call)


def rerank(
    state: LoadedSet,
    ctx: RankContext,
    rules: tuple[AnyRule, ...],
    attributes: list[str],
    cand: Rows,
    model_scores: np.ndarray | None,
    exclude: np.ndarray,
    recent: np.ndarray,
) -> RankResult:
    """The rule chain over the scored candidates (model scores, or ANN scores on
    the ``ann_order`` rung), and the answer it makes (CPU only).

    Args:
        attributes: the item-table columns the rules read.
    """
    q = ctx.query
    cand_ids, cand_scores = cand.ids, cand.scores
    slate = Slate(
        ids=cand_ids,
        attributes=state.items.take(attributes, cand.rows),
        embeddings_of=lambda idx: state.diversity_of(cand_ids[idx]),
        attribute_of=state.attribute_of,
        exclude=exclude,
        recent=recent,
        categories=GENRE_INDEX,
    )
    order_by = cand_scores if model_scores is None else model_scores
    out = run_chain(rules, slate, order_by, q.k, explain=q.debug)
    chosen = out.chosen
    for note in out.notes:
        ctx.note(note)
    if len(chosen) < q.k:
        ctx.note(f"short_list: only {len(chosen)} candidates for k={q.k}")
    shown_model = np.zeros(len(cand_ids), np.float32) if model_scores is None else model_scores
    return ctx.answer(
        cand_ids[chosen],
        out.final_scores,
        cand_scores[chosen],
        shown_model[chosen],
        cand.ranks[chosen].astype(np.int32),
        state.version,
        sources=cand.sources[chosen],
        moved_by=out.moved_by,
        dropped=[
            (int(cand_ids[i]), rule, why, float(shown_model[i])) for i, rule, why in out.dropped
        ],
    )
