"""The funnel's stages after retrieval, one function each, over one request's
``RankContext`` and the ``LoadedSet`` it took. ``ranker/pipeline.py`` calls them
in order; the CPU-only ones run on the ranker's CPU thread.

    user_features   online store (breaker, retries, deadline), else the user cache
    candidate_rows  ANN + popular candidates, their item-table rows, model inputs
    score_here      the model on this thread (or ``score_batched``: across requests)
    rerank          the rule chain over the scored candidates -> the answer
"""

from __future__ import annotations

import asyncio
import logging
from typing import NamedTuple

import numpy as np
from redis.asyncio.retry import Retry

from features.definitions import USER_VIEW
from features.reader import FeatureFrame
from protos.sieve.v1 import sieve_pb2
from ranker import ladder
from ranker.config import ReliabilityConfig
from ranker.context import RankContext, RankResult
from ranker.features import ITEM_INPUTS, USER_INPUTS, assemble, with_popular
from ranker.loaded import LoadedSet
from ranker.rerank import AnyRule, Slate, run_chain
from ranker.resilience import Breaker, TtlCache
from ranker.scorer import OnnxScorer, replace_nonfinite
from sieve.batcher import MicroBatcher, per_group
from sieve.data import GENRE_INDEX

log = logging.getLogger(__name__)


class Rows(NamedTuple):
    """A request's candidates as the model sees them."""

    ids: np.ndarray  # int64
    scores: np.ndarray  # ANN scores, float32
    ranks: np.ndarray  # ANN ranks (-1: a popular item the search missed)
    rows: np.ndarray  # rows of the item table
    x: np.ndarray  # model inputs [n, MODEL_FEATURES]
    n_bad: int  # non-finite inputs replaced by defaults


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
                    lambda: state.reader.read(USER_VIEW, ids), lambda _: None
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


def candidate_rows(
    state: LoadedSet,
    ctx: RankContext,
    resp: sieve_pb2.RetrieveResponse,
    exclude: np.ndarray,
    vector: np.ndarray,
    user: FeatureFrame,
    rel: ReliabilityConfig,
) -> Rows:
    """The candidates (ANN + popular), cut to the best by ANN when retrieval ran
    late (``fewer_candidates``), with their item-table rows and model inputs
    (CPU only)."""
    cand_ids, cand_scores, cand_ranks = with_popular(
        np.asarray(resp.item_ids, np.int64),
        np.asarray(resp.scores, np.float32),
        state.popular_ids,
        exclude,
        state.n_popular,
        vector,
        state.embeddings_of,
        state.popular_embeddings,
    )
    left = ctx.deadlines.left("score")
    if ladder.fewer_candidates(left, rel, len(cand_ids)):
        n_keep = rel.degraded_candidates
        keep = np.sort(np.argsort(-cand_scores, kind="stable")[:n_keep])
        ctx.take(
            "fewer_candidates",
            f"fewer_candidates: {left * 1e3:.1f} ms left for item features and scoring; "
            f"scored the top {n_keep} of {len(cand_ids)} candidates by ANN score",
        )
        cand_ids, cand_scores, cand_ranks = cand_ids[keep], cand_scores[keep], cand_ranks[keep]
    rows, found = state.items.rows(cand_ids)
    if not found.all():
        ctx.note(f"missing_item_features: {int((~found).sum())} candidates dropped")
        cand_ids, cand_scores, rows = cand_ids[found], cand_scores[found], rows[found]
        cand_ranks = cand_ranks[found]
    x = assemble(
        cand_scores,
        cand_ranks,
        {name: user.array(name) for name in USER_INPUTS},
        state.items.take(ITEM_INPUTS, rows),
    )
    n_bad = replace_nonfinite(x, state.feature_defaults)
    if n_bad:
        ctx.note(f"nonfinite_features: {n_bad} values scored with defaults")
    return Rows(cand_ids, cand_scores, cand_ranks, rows, x, n_bad)


def score_here(
    state: LoadedSet, ctx: RankContext, x: np.ndarray, rel: ReliabilityConfig
) -> np.ndarray | None:
    """Model scores of the rows ``x`` by a model call on this thread, or None (the
    ``ann_order`` rung, recorded in ``ctx``): no time to score, or the model failed."""
    why = ladder.no_time_to_score(ctx.deadlines.left("score"), rel)
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
    if not why:
        try:
            async with asyncio.timeout(left):
                return await batcher.submit((state.scorer, x))
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
        embeddings_of=lambda idx: state.embeddings_of(cand_ids[idx]),
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
        moved_by=out.moved_by,
        dropped=[
            (int(cand_ids[i]), rule, why, float(shown_model[i])) for i, rule, why in out.dropped
        ],
    )
