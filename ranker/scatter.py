"""Scatter-gather over a sharded candidate index (``candidate/shards.py``): every
Retrieve goes to all shards at once, each a ``CandidateClient`` with its own
channel, breaker and the stage's whole deadline, and their answers are merged by
score into one ``RetrieveResponse``.

A shard that fails, is late or answers as another shard leaves the others'
merge as a partial answer, Vespa's degraded coverage: the ranker takes the
``partial_candidates`` rung with the coverage in ``degradations``, never a failure.
Only when no shard answers does the Rank take the ladder's later rungs. Every
call is pinned to the request's artifact version, and a new set goes live only
once every shard holds it (``holds``), so a Rank never mixes versions across
shards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import numpy as np

from protos.sieve.v1 import sieve_pb2
from ranker.candidates import CandidateClient
from ranker.config import RankerConfig
from sieve.tracing import Tracer

log = logging.getLogger(__name__)


def merge_top(
    lists: Sequence[tuple[Sequence[int], Sequence[float]]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several (item ids, scores) lists by score, best first.

    Each list is one shard's top-k of its own items; the shards' items are
    disjoint, so the merged top-k of exact shards is the exact top-k of the
    whole catalog. Equal scores keep shard order (a stable sort)."""
    ids = np.concatenate([np.asarray(i, np.int64) for i, _ in lists])
    scores = np.concatenate([np.asarray(s, np.float32) for _, s in lists])
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


def merge_responses(
    answers: Sequence[sieve_pb2.RetrieveResponse], k: int, more_ks: Sequence[int]
) -> sieve_pb2.RetrieveResponse:
    """The shards' answers as one: each space's lists merged (``merge_top``), the
    slowest shard's search time. A ``more`` search is answered only when every
    shard answered it (a shard that predates the field answers none)."""
    ids, scores = merge_top([(a.item_ids, a.scores) for a in answers], k)
    more = []
    if all(len(a.more) == len(more_ks) for a in answers):
        for j, mk in enumerate(more_ks):
            lists = [(a.more[j].item_ids, a.more[j].scores) for a in answers]
            m_ids, m_scores = merge_top(lists, mk)
            more.append(
                sieve_pb2.SpaceResult(
                    source=answers[0].more[j].source,
                    item_ids=m_ids.tolist(),
                    scores=m_scores.tolist(),
                    search_us=max(a.more[j].search_us for a in answers),
                )
            )
    return sieve_pb2.RetrieveResponse(
        item_ids=ids.tolist(),
        scores=scores.tolist(),
        artifact_version=answers[0].artifact_version,
        search_us=max(a.search_us for a in answers),
        more=more,
    )


def _reason(why: str) -> str:
    """A shard client's failure without its ``retrieve_failed: `` prefix."""
    return why.split(": ", 1)[1] if ": " in why else why


class ShardedCandidates:
    """``CandidateClient``'s interface over ``config.candidate_shards``."""

    def __init__(
        self,
        config: RankerConfig,
        congested: Callable[[], bool] = lambda: False,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.shards = [
            CandidateClient(config, congested, address, f"candidate_shard{i}", tracer)
            for i, address in enumerate(config.candidate_shards)
        ]

    @property
    def in_flight(self) -> int:
        return max(c.in_flight for c in self.shards)

    def start(self) -> None:
        for c in self.shards:
            c.start()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.shards))

    async def retrieve(
        self,
        version: str,
        vector: np.ndarray,
        exclude: np.ndarray,
        timeout_s: float,
        k: int,
        source: str = "",
        more: Sequence[tuple[str, np.ndarray, int]] = (),
    ) -> tuple[sieve_pb2.RetrieveResponse | None, str]:
        """As ``CandidateClient.retrieve``, from every shard at once. A merged
        answer that lacks shards comes with why, as ``partial_candidates: ...``
        (the rung's degradation); no answer at all, with ``retrieve_failed: ...``."""
        found = await asyncio.gather(
            *(c.retrieve(version, vector, exclude, timeout_s, k, source, more) for c in self.shards)
        )
        count = len(self.shards)
        answers, missing = [], []
        for i, (resp, why) in enumerate(found):
            if resp is not None and (resp.shard_count != count or resp.shard != i):
                log.error(
                    "candidate shard %d (%s) answered as shard %d of %d; check candidate_shards",
                    i, self.shards[i].address, resp.shard, resp.shard_count,
                )  # fmt: skip
                why = f"answered as shard {resp.shard} of {resp.shard_count}"
                resp = None
            if resp is None:
                missing.append(f"shard {i}: {_reason(why)}")
            else:
                answers.append(resp)
        if not answers:
            what = "retrieve_failed" if source in ("", "learned") else f"{source}_source_failed"
            return None, f"{what}: no shard answered ({'; '.join(missing)})"
        merged = merge_responses(answers, k, [n for _, _, n in more])
        if not missing:
            return merged, ""
        coverage = 100.0 * len(answers) / count
        return merged, (
            f"partial_candidates: coverage {coverage:.0f}% ({len(answers)} of {count} shards; "
            + "; ".join(missing)
            + ")"
        )

    async def holds(self, version: str, dim: int) -> bool:
        """Whether every shard answers a Retrieve pinned to ``version``: a new set
        goes live only then, so no Rank mixes versions across shards."""
        held = await asyncio.gather(*(c.holds(version, dim) for c in self.shards))
        return all(held)
