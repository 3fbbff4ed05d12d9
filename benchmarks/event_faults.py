"""Nothing lost: the feedback loop under faults, one row per fault.

    python -m benchmarks.event_faults --work /tmp/fresh [--items 20000] \\
        [--rate 200] [--seconds 12]

The processes of ``benchmarks.freshness`` (``EventStack``: the stream's Redis with
``appendonly yes``, two ``sieve events`` workers). For each row this process sends
ratings (unique event ids, random users and items) at ``--rate`` for
``--seconds``, retrying a batch that is not acknowledged (UNAVAILABLE) with the
same event ids, as a client should; a third of the way in the fault starts:

- ``worker_kill``: SIGKILL worker 0 at a moment it holds entries it read and has
  not acknowledged (polled with XPENDING; they stay pending); it restarts two
  thirds of the way in, and worker 1 claims them after ``claim_idle_ms``;
- ``stream_kill``: SIGKILL the stream's Redis, restarted from its AOF 1.5 s later;
- ``poison``: malformed entries written straight into the stream among the good.

Then it waits for the group to drain and counts, per row: sent, acknowledged,
applied (the event's done marker in Redis), visible (the rated item in the user's
``user_events`` row that Feast's online store holds, read as the ranker reads
it), duplicated (redeliveries the workers skipped), dead letters, and lost
(acknowledged but not visible). Writes ``RESULTS/event_faults/event_faults.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.freshness import EventStack, drive, summarize
from benchmarks.harness import RESULTS, machine

ROWS = ("worker_kill", "stream_kill", "poison")


async def send(address: str, st: EventStack, rate: float, seconds: float,
               fault: Any) -> dict[str, Any]:  # fmt: skip
    """Ratings at ``rate`` for ``seconds``; ``fault()`` a third of the way in.
    Returns the events sent and acknowledged ((user, item) by event id)."""
    import grpc

    from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc

    rng = np.random.default_rng(int(time.time()))
    per = max(1, round(rate * 0.05))
    sent: dict[str, tuple[int, int]] = {}
    acked: set[str] = set()
    refusals = {"n": 0}

    async def batch_until_acked(stub: Any, events: list[Any]) -> None:
        for attempt in range(200):
            try:
                await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=events), timeout=5)
                acked.update(e.event_id for e in events)
                return
            except grpc.aio.AioRpcError:
                refusals["n"] += 1
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))

    async with grpc.aio.insecure_channel(address) as ch:
        stub = sieve_pb2_grpc.RankerServiceStub(ch)
        tasks = []
        t0 = tick = time.monotonic()
        fired = False
        while time.monotonic() - t0 < seconds:
            if not fired and time.monotonic() - t0 > seconds / 3:
                fired = True
                asyncio.get_running_loop().run_in_executor(None, fault, t0 + 2 * seconds / 3)
            events = []
            for _ in range(per):
                eid, u, i = uuid.uuid4().hex, int(rng.choice(st.users)), int(rng.choice(st.items))
                sent[eid] = (u, i)
                events.append(sieve_pb2.Event(
                    event_id=eid, user_id=u, item_id=i, type=sieve_pb2.EVENT_TYPE_RATING,
                    value=4.0, timestamp_ms=int(time.time() * 1000),
                ))  # fmt: skip
            tasks.append(asyncio.create_task(batch_until_acked(stub, events)))
            tick += 0.05
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
        await asyncio.gather(*tasks)
    return {"sent": sent, "acked": acked, "refusals": refusals["n"]}


async def visible(st: EventStack, pairs: dict[str, tuple[int, int]]) -> set[str]:
    """Event ids whose rated item is in the user's ``user_events`` row."""
    from features.events import USER_EVENTS_VIEW, events_repo
    from features.reader import open_reader

    reader = open_reader(events_repo(st.root))
    await reader.start()
    try:
        users = np.array(sorted({u for u, _ in pairs.values()}), np.int64)
        seen: dict[int, set[int]] = {}
        for start in range(0, len(users), 500):
            part = users[start : start + 500]
            frame = await reader.read(USER_EVENTS_VIEW, part)
            for u, items in zip(part, frame.lists("event_seen_item_ids"), strict=True):
                seen[int(u)] = set(items.tolist())
    finally:
        await reader.close()
    return {eid for eid, (u, i) in pairs.items() if i in seen.get(u, ())}


def drained(r: Any, cfg: Any, within_s: float = 60.0) -> float:
    """Seconds until the group has read everything and nothing is pending."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        try:
            (g,) = [g for g in r.xinfo_groups(cfg.stream) if g["name"].decode() == cfg.group]
            if g["pending"] == 0 and g.get("lag", 1) == 0:
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - Redis restarting
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the group did not drain within {within_s} s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from features.events import EventsConfig

    rows: dict[str, Any] = {}
    killed_holding: list[int] = []
    with EventStack(Path(args.work), args.items, 2) as st:
        cfg = EventsConfig(enabled=True)
        r = redis.Redis(host="127.0.0.1", port=st.events_port)

        def worker_kill(until: float) -> None:
            # SIGKILL worker 0 while it holds entries it read and has not
            # acknowledged (mid-batch), if that moment comes within 5 s
            deadline = time.monotonic() + 5.0
            held: Any = []
            while time.monotonic() < deadline:
                held = r.xpending_range(cfg.stream, cfg.group, "-", "+", 1000, consumername="w0")
                if held:
                    break
            st.kill_worker(0)
            killed_holding.append(len(held))
            time.sleep(max(0.0, until - time.monotonic()))
            st.start_worker(0)

        def stream_kill(until: float) -> None:
            st.kill_stream()
            time.sleep(1.5)
            st.start_stream()

        def poison(until: float) -> None:
            for n in range(10):
                r.xadd(cfg.stream, {"id": f"poison{n}", "type": "rating", "user": "x"})
                time.sleep(0.05)

        for name in ROWS:
            fault = {"worker_kill": worker_kill, "stream_kill": stream_kill, "poison": poison}
            before = _counts(r, cfg)
            out = asyncio.run(send(st.address, st, args.rate, args.seconds, fault[name]))
            drain_s = drained(r, cfg)
            after = _counts(r, cfg)
            acked = {e: out["sent"][e] for e in out["acked"]}
            with r.pipeline(transaction=False) as pipe:
                for e in acked:
                    pipe.exists(f"{cfg.prefix}done:{e}")
                applied = sum(pipe.execute())
            shown = asyncio.run(visible(st, acked))
            rows[name] = {
                "sent": len(out["sent"]),
                "acknowledged": len(acked),
                "not_acknowledged_retries": out["refusals"],
                "applied": applied,
                "visible": len(shown),
                "duplicated": after["duplicates"] - before["duplicates"],
                "dead_letters": after["dead"] - before["dead"],
                "lost": len(acked) - len(shown),
                "drained_after_s": round(drain_s, 2),
            }
            if name == "worker_kill":
                rows[name]["entries_held_at_kill"] = killed_holding[0]
            print(name, rows[name], flush=True)
        fresh = None
        if args.probe_s > 0:  # freshness probes on the same processes, after the faults
            probe_args = argparse.Namespace(
                seconds=args.probe_s, event_rate=args.probe_rate, poll_ms=25.0
            )
            measured = asyncio.run(drive(st.address, st.users, st.items, probe_args))
            fresh = summarize(measured, args.probe_s)
    return {"machine": machine(), "args": vars(args), "rows": rows, "freshness": fresh}


def _counts(r: Any, cfg: Any) -> dict[str, int]:
    stats = r.hgetall(f"{cfg.prefix}stats")
    return {
        "duplicates": int(stats.get(b"duplicates", 0)),
        "dead": int(r.xlen(cfg.dead_letter)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=200.0, help="events/s")
    ap.add_argument("--seconds", type=float, default=12.0, help="per row")
    ap.add_argument(
        "--probe-s", type=float, default=0.0,
        help="then this many seconds of benchmarks.freshness probes on the same processes",
    )  # fmt: skip
    ap.add_argument("--probe-rate", type=float, default=200.0, help="their events/s")
    ap.add_argument("--results", default=str(RESULTS / "event_faults"))
    args = ap.parse_args()
    result = run(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "event_faults.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
