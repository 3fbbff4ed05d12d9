"""What keeps Rank answering when a dependency is slow or gone: stage deadlines,
circuit breakers, and the in-process cache of users' last read features.

The pipeline (``ranker/pipeline.py``) decides the rungs of the degradation ladder;
these are the pieces it decides with. None of them does I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from ranker.config import BreakerConfig, StageBudgetMs
from sieve.metrics import BREAKER_STATE

STAGES = ("user_features", "retrieve", "item_features", "score", "rerank")
"""The timed stages of a Rank, in request order (each has a line of ``StageBudgetMs``)."""


class Deadlines:
    """When each stage of one request must be done, on the ``time.perf_counter`` clock.

    A stage ends at the request's start plus the budgets of every stage up to and
    including it, plus the shared headroom: time a stage leaves unused goes to the
    next one, and every stage may dip into what is left of the headroom. With a
    caller deadline, a stage also ends early enough to leave the later stages (and
    the network hop back) their own budgets.
    """

    def __init__(
        self, budget: StageBudgetMs, start: float, caller_left_s: float | None = None
    ) -> None:
        self.start = start
        lines = [getattr(budget, s) / 1e3 for s in STAGES]
        headroom = budget.headroom / 1e3
        later = [sum(lines[i + 1 :]) + budget.hops / 1e3 for i in range(len(lines))]
        self._end: dict[str, float] = {}
        spent = 0.0
        for stage, line, after in zip(STAGES, lines, later, strict=True):
            spent += line
            end = start + spent + headroom
            if caller_left_s is not None:
                end = min(end, start + caller_left_s - after)
            self._end[stage] = end

    def end(self, stage: str) -> float:
        return self._end[stage]

    def left(self, stage: str, now: float | None = None) -> float:
        """Seconds until ``stage`` must be done (negative: already late)."""
        return self._end[stage] - (time.perf_counter() if now is None else now)


CLOSED, OPEN, HALF_OPEN = 0, 1, 2


class Breaker:
    """A consecutive-failure circuit breaker with a half-open probe.

    Closed: calls go through, and ``failures`` failures in a row open it. Open:
    ``allow()`` is False (callers take their fallback at once instead of waiting on
    a dead dependency) until ``open_s`` has passed. Half-open: one call, the probe,
    is let through; its success closes the breaker, its failure opens it again. A
    probe that never reports (its caller was cancelled) is replaced after ``open_s``.

    Single-threaded (one event loop); ``on_change(state)`` feeds a metric.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        on_change: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failures, self.open_s = config.failures, config.open_s
        self._on_change = on_change
        self._clock = clock
        self.state = CLOSED
        self._failed = 0  # consecutive failures while closed
        self._since = 0.0  # when it opened, or when the probe went out

    @classmethod
    def reported(cls, name: str, config: BreakerConfig) -> Breaker:
        """A breaker whose state is the ``sieve_breaker_state`` gauge of ``name``
        (0, closed, from the start)."""
        BREAKER_STATE.labels(name).set(CLOSED)
        return cls(name, config, BREAKER_STATE.labels(name).set)

    def _set(self, state: int) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """Whether the caller may call the dependency now (and must then report
        ``success()`` or ``failure()``)."""
        if self.state == CLOSED:
            return True
        now = self._clock()
        if now - self._since < self.open_s:
            return False  # open, or half-open with the probe out
        self._since = now
        self._set(HALF_OPEN)
        return True

    def success(self) -> None:
        self._failed = 0
        self._set(CLOSED)

    def inconclusive(self) -> None:
        """The call says nothing about the dependency: it was given less time than
        its own budget (the caller's queueing used the rest). Neither a failure nor
        a success; a half-open probe that ends so lets the next call probe at once."""
        if self.state == HALF_OPEN:
            self._since = self._clock() - self.open_s

    def failure(self) -> None:
        self._failed += 1
        if self.state == HALF_OPEN or self._failed >= self.failures:
            self._since = self._clock()
            self._set(OPEN)


LATE_WEIGHT = 0.1
"""Weight of the newest answer in ``InFlightLimit.late_share``."""
CONGESTED = 0.5
"""``InFlightLimit.congested`` from this share of late answers on."""


class InFlightLimit:
    """How many Rank calls to serve at once, learned from the answers (AIMD, the
    shape of TCP's congestion window and Netflix's concurrency-limits).

    An answer that ran out of time (``RankResult.out_of_time``: the ranker's own
    queueing ate a stage's budget), while more than ``late_above`` of the recent
    answers did (an EWMA over about the last ``1 / LATE_WEIGHT``) and more than
    ``min_limit`` calls are in flight, cuts the limit to ``backoff`` x the calls in
    flight then, at most once per ``window_s`` (one burst of late answers is one
    signal). Each timely
    answer adds ``1 / limit``, so a limit that fits grows by about one call per
    ``limit`` answers, up to ``max_limit``. Calls past the limit
    are shed at once: under overload the admitted calls keep their time (and full
    quality) and a healthy dependency is never blamed for the ranker's queue.
    """

    def __init__(
        self,
        min_limit: int,
        max_limit: int,
        backoff: float = 0.8,
        window_s: float = 0.05,
        late_above: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        adaptive: bool = True,
    ) -> None:
        self.adaptive = adaptive  # False: the limit stays max_limit (congestion is still kept)
        self.min_limit, self.max_limit = min_limit, max_limit
        self.backoff, self.window_s, self._clock = backoff, window_s, clock
        self.value = float(max_limit)
        self.late_above = late_above
        self.late_share = 0.0  # of recent answers that ran out of time (EWMA)
        self._cut_at = -float("inf")

    @property
    def limit(self) -> int:
        return int(self.value)

    @property
    def congested(self) -> bool:
        """Most recent answers ran out of time: this ranker is past what it can serve
        in time (``CONGESTED`` of them), so a dependency's missed deadline is likely
        its own queue's doing."""
        return self.late_share >= CONGESTED

    def answered(self, out_of_time: bool, in_flight: int) -> None:
        """Record one answer; ``in_flight``: calls being served as it finished (itself
        included)."""
        self.late_share += LATE_WEIGHT * (float(out_of_time) - self.late_share)
        if not self.adaptive:
            return
        if not out_of_time:
            self.value = min(float(self.max_limit), self.value + 1.0 / self.value)
            return
        if in_flight <= self.min_limit or self.late_share < self.late_above:
            return  # a hiccup, or the late tail of a load the box serves: not congestion
        now = self._clock()
        if now - self._cut_at >= self.window_s:
            self._cut_at = now
            self.value = max(float(self.min_limit), min(self.value, in_flight) * self.backoff)


K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most ``size`` entries, each served for ``ttl_s`` after it was put; the
    least recently put go first."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.size, self.ttl_s, self._clock = size, ttl_s, clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def put(self, key: K, value: V) -> None:
        if self.size == 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = (self._clock(), value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, key: K) -> V | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        at, value = hit
        if self._clock() - at > self.ttl_s:
            del self._entries[key]
            return None
        return value

    def __len__(self) -> int:
        return len(self._entries)
