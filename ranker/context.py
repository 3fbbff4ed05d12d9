"""One Rank request: its validated query, and the record it carries through the
funnel (deadlines, stage times, the ladder's rungs and every degradation), from
which its answer is made."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from protos.sieve.v1 import sieve_pb2
from ranker.config import RankerConfig
from ranker.resilience import Deadlines
from sieve.errors import InvalidRequest
from sieve.validation import id_list


@dataclass(frozen=True)
class RankQuery:
    user_id: int
    k: int
    exclude: np.ndarray  # int64
    debug: bool


def parse_rank(req: sieve_pb2.RankRequest, config: RankerConfig) -> RankQuery:
    """Validate a RankRequest (k=0 means the default).

    Raises:
        InvalidRequest: saying which field is wrong and what is allowed.
    """
    if req.user_id <= 0:
        raise InvalidRequest(f"user_id must be a positive integer, got {req.user_id}")
    k = req.k or config.default_k
    if not 1 <= k <= config.max_k:
        raise InvalidRequest(
            f"k must be in 1..{config.max_k} (0 for {config.default_k}), got {req.k}"
        )
    exclude = id_list(req.exclude_item_ids, config.max_exclude, "exclude_item_ids")
    return RankQuery(req.user_id, k, exclude, req.debug)


@dataclass
class RankResult:
    item_ids: np.ndarray
    final_scores: np.ndarray
    candidate_scores: np.ndarray
    model_scores: np.ndarray
    candidate_ranks: np.ndarray
    version: str
    timings: list[tuple[str, int]] = field(default_factory=list)
    degradations: list[str] = field(default_factory=list)
    rungs: list[str] = field(default_factory=list)
    """The degradation-ladder rungs taken, in ladder order; empty: full quality."""
    moved_by: list[list[str]] = field(default_factory=list)  # debug: per returned item
    sources: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    """uint8 source bits per returned item (``ranker/sources.py``); empty when the
    answer came from the response cache."""
    dropped: list[tuple[int, str, str, float]] = field(default_factory=list)
    """debug: (item id, rule, reason, model score)."""
    out_of_time: bool = False
    """A stage gave up work for lack of time (``RankContext.out_of_time``)."""


class RankContext:
    """What one request records on its way through the funnel.

    ``mark(stage)`` closes a stage's time (since the previous mark); ``take(rung,
    why)`` records a rung of the degradation ladder with its reason; ``note(why)``
    a degradation that is not a rung (e.g. a cold-start user, a short list).
    Used by one request at a time (its event-loop task, or the CPU thread it
    hands a stage to, never both at once).
    """

    def __init__(
        self,
        query: RankQuery,
        deadlines: Deadlines,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.query = query
        self.deadlines = deadlines
        self._clock = clock
        self.start = self._last = deadlines.start
        self.marks: list[tuple[str, int]] = []
        self.rungs: list[str] = []
        self.degradations: list[str] = []
        self.out_of_time = False
        """Set by a stage that gave up work because this request's time ran out
        (fewer candidates, no scoring, a Retrieve given less than its own budget),
        not because a dependency failed: the ranker's in-flight limit reacts to it
        (``ranker/service.py``)."""

    @property
    def full_quality(self) -> bool:
        """No rung taken (degradations that are not rungs may still be listed)."""
        return not self.rungs

    def mark(self, stage: str) -> None:
        now = self._clock()
        self.marks.append((stage, int((now - self._last) * 1e6)))
        self._last = now

    def take(self, rung: str, why: str) -> None:
        self.rungs.append(rung)
        self.degradations.append(why)

    def note(self, why: str) -> None:
        self.degradations.append(why)

    def timings(self) -> list[tuple[str, int]]:
        """The stage times in microseconds, then the total since the request began."""
        return [*self.marks, ("total", int((self._clock() - self.start) * 1e6))]

    def answer(
        self,
        item_ids: np.ndarray,
        final_scores: np.ndarray,
        candidate_scores: np.ndarray,
        model_scores: np.ndarray,
        candidate_ranks: np.ndarray,
        version: str,
        moved_by: list[list[str]] | None = None,
        dropped: list[tuple[int, str, str, float]] | None = None,
        sources: np.ndarray | None = None,
    ) -> RankResult:
        """The answer, carrying this request's rungs and degradations (its timings
        are set by ``finish``)."""
        return RankResult(
            item_ids=item_ids,
            final_scores=final_scores,
            candidate_scores=candidate_scores,
            model_scores=model_scores,
            candidate_ranks=candidate_ranks,
            version=version,
            degradations=self.degradations,
            rungs=self.rungs,
            moved_by=moved_by or [],
            dropped=dropped or [],
            sources=np.empty(0, np.uint8) if sources is None else sources,
        )

    def finish(self, result: RankResult, stage: str) -> RankResult:
        """Close the last ``stage`` and stamp ``result`` with every stage's time."""
        self.mark(stage)
        result.timings = self.timings()
        result.out_of_time = self.out_of_time
        return result
