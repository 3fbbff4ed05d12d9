"""``sieve replay``: what freshness buys, measured on the set's own holdout.

The held-out ratings of a sample of users (each user's first ``steps`` in time
order) are played back against two running rankers of the same set, side by
side: a *frozen* one (no events: what the build knew) and a *fresh* one (events
on, ``sieve events`` workers running). In rounds: round j takes every sampled
user's j-th held-out rating, in time order; for each, both rankers are asked
for the user's top k first (the same moment, concurrently), then the rating is
sent to the fresh one as an event. A round lasts at least ``gap_s``, so the
event is applied before the user's next Rank (the freshness budget is 1 s).

The score is the hit rate of the *next* item: the share of steps whose held-out
item (a positive rating, >= the build's threshold) is in that Rank's top k,
averaged per user, with a 95% bootstrap interval over users and the paired
ratio fresh / frozen. Also counted: answers holding an item the user rated at
an earlier step of the replay (the fresh ranker should not show one: it can
when the events read was late, ``events_unavailable``, or the answer came from a
rung of the ladder; both are counted too).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import numpy as np
import pandas as pd

from ranker.evaluate import bootstrap_ci, paired_ratio_ci
from sieve import artifacts

MODES = ("frozen", "fresh")


def replay_plan(aset: artifacts.ArtifactSet, users: int, steps: int, seed: int) -> pd.DataFrame:
    """The rounds: ``users`` sampled users with at least two held-out ratings, each
    user's first ``steps`` of them in time order, with ``round`` (0-based)."""
    holdout = pd.read_parquet(aset.verified("holdout"))
    counts = holdout.groupby("userId").size()
    eligible = np.sort(counts[counts >= 2].index.to_numpy())
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(eligible)[:users]
    part = holdout[holdout["userId"].isin(chosen)].sort_values(["userId", "timestamp", "movieId"])
    part = part.assign(round=part.groupby("userId").cumcount())
    return part[part["round"] < steps].sort_values(["round", "timestamp"]).reset_index(drop=True)


async def replay(
    frozen: str,
    fresh: str,
    plan: pd.DataFrame,
    k: int,
    positive: float,
    gap_s: float,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, Any]:
    """Play ``plan`` against the rankers at ``frozen`` and ``fresh`` (addresses)."""
    import grpc

    from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc

    hits: dict[str, dict[int, list[bool]]] = {"frozen": {}, "fresh": {}}
    rated_shown = {"frozen": 0, "fresh": 0}
    on_rung = {"frozen": 0, "fresh": 0}
    no_events = 0  # fresh answers that went on without the user's events row
    rated: dict[int, set[int]] = {}
    answers = 0
    async with (
        grpc.aio.insecure_channel(frozen) as ch_frozen,
        grpc.aio.insecure_channel(fresh) as ch_fresh,
    ):
        stubs = {
            "frozen": sieve_pb2_grpc.RankerServiceStub(ch_frozen),
            "fresh": sieve_pb2_grpc.RankerServiceStub(ch_fresh),
        }
        for _, steps in plan.groupby("round", sort=True):
            started = time.monotonic()
            for user, item, rating in steps[["userId", "movieId", "rating"]].itertuples(
                index=False
            ):
                user, item = int(user), int(item)
                req = sieve_pb2.RankRequest(user_id=user, k=k)
                got = await asyncio.gather(
                    *(
                        stubs[m].Rank(req, timeout=10, metadata=metadata)
                        for m in ("frozen", "fresh")
                    )
                )
                answers += 1
                for mode, resp in zip(MODES, got, strict=True):
                    ids = {i.item_id for i in resp.items}
                    on_rung[mode] += bool(resp.rungs)
                    if mode == "fresh" and any(
                        d.startswith("events_unavailable") for d in resp.degradations
                    ):
                        no_events += 1
                    if ids & rated.get(user, set()):
                        rated_shown[mode] += 1
                    if rating >= positive:
                        hits[mode].setdefault(user, []).append(item in ids)
                event = sieve_pb2.Event(
                    event_id=uuid.uuid4().hex, user_id=user, item_id=item,
                    type=sieve_pb2.EVENT_TYPE_RATING, value=float(rating),
                    timestamp_ms=int(time.time() * 1000), request_id=got[1].request_id,
                    artifact_version=got[1].artifact_version,
                )  # fmt: skip
                await stubs["fresh"].RecordEvents(
                    sieve_pb2.RecordEventsRequest(events=[event]), timeout=10, metadata=metadata
                )
                rated.setdefault(user, set()).add(item)
            await asyncio.sleep(max(0.0, gap_s - (time.monotonic() - started)))
    users = sorted(set(hits["frozen"]) & set(hits["fresh"]))
    per_user = {m: np.array([np.mean(hits[m][u]) for u in users]) for m in hits}
    report: dict[str, Any] = {
        "users": len(users),
        "steps": int(len(plan)),
        "answers_per_ranker": answers,
        "k": k,
        "positive_rating": positive,
        "answers_showing_an_item_rated_earlier": rated_shown,
        "answers_on_a_rung": on_rung,
        "fresh_answers_without_the_events_row": no_events,
    }
    for m in ("frozen", "fresh"):
        mean, low, high = bootstrap_ci(per_user[m]) if users else (float("nan"),) * 3
        report[f"hit_rate_{m}"] = {"mean": mean, "low": low, "high": high}
    if users:
        r, low, high = paired_ratio_ci(per_user["fresh"], per_user["frozen"])
        report["fresh_over_frozen"] = {"ratio": r, "low": low, "high": high}
    return report
