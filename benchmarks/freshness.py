"""Freshness: an acknowledged event -> visible in Rank, under event and Rank load.

    python -m benchmarks.freshness --work /tmp/fresh [--items 20000] \\
        [--event-rate 1000] [--rank-rate 50] [--seconds 60] [--workers 2]

Every part its own process on loopback: the feature store's ``redis-server``
(``WORK/redis``, the set built once, as ``benchmarks.latency_budget`` does), a
second ``redis-server`` for the event stream with ``appendonly yes`` (fresh each
run), ``sieve serve`` (candidate and ranker, ``[ranker.events]`` on), ``--workers``
``sieve events`` workers, and the Rank load generator at ``--rank-rate``.

This process sends ``--event-rate`` events/s (batches of 50 every 50 ms; a mix of
impressions, clicks and ratings of random items by four fifths of the users) and,
twice a second, a probe on one of the other fifth, in turn: Rank the user, rate
the answer's first item, and from the acknowledgement Rank that user every
``--poll-ms`` until the item is gone. Freshness is the time from the
acknowledgement to the first full-quality answer without it (an upper bound, to
the poll interval; it includes that Rank's own time). The rankers run the
default rule chain without ``fatigue`` (which demotes what was just shown, and
would pass for the event's effect); every fourth probe is a control that sends
no event and polls for 1 s: its item must stay. Answers on a rung of the ladder
(another path: fewer candidates, popular items) and answers that went on without
the events row (``events_unavailable``: counted, the share under load) are
polled past, not judged. Writes ``RESULTS/freshness/freshness.json`` and
``freshness.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    RESULTS,
    ROOT,
    bench_config,
    build_once,
    loadgen_command,
    machine,
    percentiles,
    process,
    pyplot,
    redis_port_of,
    serving,
    users_sample,
)
from sieve import artifacts
from sieve.local_redis import free_port, local_redis, start_redis, wait_for_redis

KINDS = (1, 2, 3)  # impression, click, rating
MIX = (0.7, 0.2, 0.1)


async def produce(stub: Any, users: np.ndarray, items: np.ndarray, rate: float,
                  until: float, acks_ms: list[float]) -> int:  # fmt: skip
    """Send ``rate`` events/s until ``until`` (monotonic), in batches every 50 ms."""
    from protos.sieve.v1 import sieve_pb2

    rng = np.random.default_rng(1)
    per = max(1, round(rate * 0.05))
    sent = 0
    tick = time.monotonic()
    pending: set[asyncio.Task[None]] = set()

    async def one(batch: list[Any]) -> None:
        t0 = time.perf_counter()
        await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=batch), timeout=10)
        acks_ms.append((time.perf_counter() - t0) * 1000)

    while time.monotonic() < until:
        now_ms = int(time.time() * 1000)
        kinds = rng.choice(KINDS, size=per, p=MIX)
        batch = [
            sieve_pb2.Event(
                event_id=uuid.uuid4().hex,
                user_id=int(rng.choice(users)),
                item_id=int(rng.choice(items)),
                type=sieve_pb2.EventType.ValueType(int(k)),
                value=float(rng.integers(1, 11) / 2) if k == 3 else 0.0,
                timestamp_ms=now_ms,
            )  # fmt: skip
            for k in kinds
        ]
        task = asyncio.create_task(one(batch))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += per
        tick += 0.05
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
    await asyncio.gather(*pending)
    return sent


async def probe(
    stub: Any, user: int, poll_ms: float, give_up_s: float, control: bool = False
) -> dict[str, Any]:
    """Rank ``user``, rate its first item, poll Rank until the item is gone. A
    ``control`` probe sends no event and polls for ``give_up_s``: the item must stay
    (else something other than the event moves it, and the figure means nothing)."""
    from protos.sieve.v1 import sieve_pb2

    first = await stub.Rank(sieve_pb2.RankRequest(user_id=user, k=50), timeout=5)
    if not first.items:
        return {"user": user, "skipped": "empty answer"}
    item = first.items[0].item_id
    ev = sieve_pb2.Event(event_id=uuid.uuid4().hex, user_id=user, item_id=item,
                         type=sieve_pb2.EVENT_TYPE_RATING, value=4.5,
                         timestamp_ms=int(time.time() * 1000),
                         request_id=first.request_id,
                         artifact_version=first.artifact_version)  # fmt: skip
    if not control:
        await stub.RecordEvents(sieve_pb2.RecordEventsRequest(events=[ev]), timeout=5)
    acked = time.perf_counter()
    polls = on_rung = no_events = 0
    while time.perf_counter() - acked < give_up_s:
        polls += 1
        resp = await stub.Rank(sieve_pb2.RankRequest(user_id=user, k=50), timeout=5)
        if resp.rungs:  # a rung's answer is another path (fewer candidates, popular)
            on_rung += 1
        elif any(d.startswith("events_unavailable") for d in resp.degradations):
            no_events += 1  # ranked without the events row: says nothing either way
        elif item not in {i.item_id for i in resp.items}:
            ms = (time.perf_counter() - acked) * 1000
            return {"user": user, "ms": ms, "polls": polls, "on_rung": on_rung,
                    "no_events": no_events, "control": control}  # fmt: skip
        await asyncio.sleep(poll_ms / 1000)
    return {"user": user, "ms": None, "polls": polls, "on_rung": on_rung,
            "no_events": no_events, "control": control}  # fmt: skip


async def drive(address: str, users: np.ndarray, items: np.ndarray,
                args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    import grpc

    from protos.sieve.v1 import sieve_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = sieve_pb2_grpc.RankerServiceStub(ch)
        acks_ms: list[float] = []
        until = time.monotonic() + args.seconds
        # Probes on a fifth of the users, taken in turn, the background events on the
        # rest: another event's rating would change a probed user's answer too.
        n_probe = max(1, len(users) // 5)
        probe_users, background = users[:n_probe], users[n_probe:]
        producer = asyncio.create_task(
            produce(stub, background, items, args.event_rate, until, acks_ms)
        )
        probes: list[asyncio.Task[dict[str, Any]]] = []
        n = 0
        while time.monotonic() < until:
            user = int(probe_users[n % n_probe])
            control = n % 4 == 3  # every fourth probe sends no event
            wait_s = 1.0 if control else 10.0
            probes.append(asyncio.create_task(probe(stub, user, args.poll_ms, wait_s, control)))
            n += 1
            await asyncio.sleep(0.5)
        sent = await producer
        done = await asyncio.gather(*probes)
    return {"sent": sent, "acks_ms": acks_ms, "probes": done}


def wait_for_workers(logs: list[tuple[Path, int]], timeout_s: float = 180.0) -> None:
    """Return once each worker's log (from the given offset on) says it runs: its
    "events worker NAME on STREAM" line comes after Feast is imported and the
    events repo is in place, just before it first reads.

    Raises:
        RuntimeError: not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = 0
        for path, offset in logs:
            with open(path, "rb") as f:
                f.seek(offset)
                started += b"events worker " in f.read()
        if started == len(logs):
            return
        time.sleep(0.2)
    raise RuntimeError(f"event workers ({[str(p) for p, _ in logs]}) did not start in time")


class EventStack:
    """The whole loop as processes, for this benchmark and ``benchmarks.event_faults``:
    the feature store's Redis (the set built once), the stream's Redis (AOF, fresh),
    candidate and ranker with ``[ranker.events]`` on, ``workers`` event workers.
    ``kill_worker``/``start_worker`` and ``kill_stream``/``start_stream`` inject faults."""

    def __init__(self, work: Path, items: int, workers: int) -> None:
        self.work = work.resolve()
        self.items_n = items
        self.n_workers = workers
        self.stack = contextlib.ExitStack()
        self.workers: dict[int, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> EventStack:
        work = self.work
        redis_port = redis_port_of(work)
        self.events_port = free_port()
        self.events_dir = work / "events_redis"
        shutil.rmtree(self.events_dir, ignore_errors=True)
        self.events_dir.mkdir(parents=True)
        # The default chain without fatigue: a shown item's demotion must not pass
        # for the event's exclusion (the control probes check that nothing else does).
        extra = (f"\n[ranker.events]\nenabled = true\n"
                 f'redis_url = "redis://127.0.0.1:{self.events_port}/0"\n'
                 '\n[ranker.rerank]\nrules = [{name = "seen"}, {name = "mmr", lambda = 0.5}, '
                 '{name = "group_cap", cap = 5}]\n')  # fmt: skip
        self.config = bench_config(work, redis_port, extra, name="sieve_events.toml")
        self.root = root = work / "artifacts"
        try:
            address = self.stack.enter_context(
                local_redis(port=redis_port, data_dir=work / "redis")
            )
            build_once(root, self.items_n, bench_config(work, redis_port), address)
            shutil.rmtree(root / "events", ignore_errors=True)  # a fresh events repo
            aset = artifacts.load(root)
            self.users_file = users_sample(aset, work)
            self.users = np.loadtxt(self.users_file, dtype=np.int64)
            self.items = aset.read_catalog(["item_id"])["item_id"].to_numpy()
            self.start_stream()
            self.stack.callback(self.kill_stream)
            _, cport = self.stack.enter_context(
                serving(
                    "candidate",
                    self.config,
                    root,
                    work,
                    "ev_candidate.log",
                    300,
                    "--candidate-port",
                    "0",
                )  # fmt: skip
            )
            _, rport = self.stack.enter_context(
                serving(
                    "ranker",
                    self.config,
                    root,
                    work,
                    "ev_ranker.log",
                    300,
                    "--ranker-port",
                    "0",
                    "--candidate-address",
                    f"127.0.0.1:{cport}",
                )  # fmt: skip
            )
            self.address = f"127.0.0.1:{rport}"
            logs = [self.work / "logs" / f"ev_worker{i}.log" for i in range(self.n_workers)]
            offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
            for i in range(self.n_workers):
                self.start_worker(i)
            self.stack.callback(self.stop_workers)
            wait_for_workers(list(zip(logs, offsets, strict=True)))
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def start_stream(self) -> None:
        self.stream_proc = start_redis(
            self.events_port, self.events_dir, ("--appendonly", "yes", "--appendfsync", "everysec")
        )
        wait_for_redis(self.stream_proc, self.events_port)

    def kill_stream(self) -> None:
        """SIGKILL the stream's Redis (no shutdown save: only the AOF keeps data)."""
        if self.stream_proc.poll() is None:
            self.stream_proc.kill()
            self.stream_proc.wait(10)

    def start_worker(self, i: int) -> None:
        log = open(self.work / "logs" / f"ev_worker{i}.log", "ab")  # noqa: SIM115
        self.workers[i] = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--config", str(self.config), "events",
             "--artifacts", str(self.root), "--consumer", f"w{i}", "--report-s", "5"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip

    def kill_worker(self, i: int) -> None:
        self.workers[i].kill()
        self.workers[i].wait(10)

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with EventStack(Path(args.work), args.items, args.workers) as st:
        cmd = loadgen_command(st.address, args.rank_rate, args.seconds, 3.0, st.users_file,
                              st.work / "fresh_load.json", seed=5)  # fmt: skip
        with process(cmd, st.work / "logs" / "fresh_loadgen.log") as load:
            measured = asyncio.run(drive(st.address, st.users, st.items, args))
            load.wait()
        rank = json.loads((st.work / "fresh_load.json").read_text())
    for key in ("hdr", "ok_hdr", "cdf_ms"):
        rank.pop(key, None)
    return {"machine": machine(), "args": vars(args), **summarize(measured, args.seconds),
            "rank_load": rank}  # fmt: skip


def summarize(measured: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Events sent and their acknowledgement times, freshness of the probes, the
    controls' outcome, and every probe."""
    probes = [p for p in measured["probes"] if "skipped" not in p and not p["control"]]
    controls = [p for p in measured["probes"] if "skipped" not in p and p["control"]]
    fresh = [p["ms"] for p in probes if p["ms"] is not None]
    return {
        "events": {
            "sent": measured["sent"],
            "rate_per_s": measured["sent"] / seconds,
            "ack_ms": percentiles(measured["acks_ms"]),
        },
        "freshness_ms": {
            **percentiles(fresh),
            "max": max(fresh) if fresh else None,
            "not_visible_in_10s": sum(p["ms"] is None for p in probes),
        },
        "controls": {
            "n": len(controls),
            "item_gone_without_an_event": sum(p["ms"] is not None for p in controls),
        },
        "polls": {
            "n": sum(p["polls"] for p in probes + controls),
            "on_a_rung": sum(p["on_rung"] for p in probes + controls),
            "without_the_events_row": sum(p["no_events"] for p in probes + controls),
        },
        "probes": measured["probes"],
    }


def plot(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fresh = sorted(
        p["ms"] for p in result["probes"] if p.get("ms") is not None and not p["control"]
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(fresh, np.linspace(0, 1, len(fresh)), drawstyle="steps-post")
    ax.axvline(1000, color="red", linestyle="--", label="target p99 1 s")
    ax.set_xlabel("acknowledged rating -> first Rank without the item (ms)")
    ax.set_ylabel("share of probes")
    a = result["args"]
    ax.set_title(f"freshness at {a['event_rate']:g} events/s, Rank {a['rank_rate']:g}/s, "
                 f"{a['workers']} workers")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "freshness.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--event-rate", type=float, default=1000.0)
    ap.add_argument("--rank-rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--poll-ms", type=float, default=25.0)
    ap.add_argument("--results", default=str(RESULTS / "freshness"))
    args = ap.parse_args()
    result = run(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "freshness.json").write_text(json.dumps(result, indent=1))
    plot(result, out)
    summary = {k: result[k] for k in ("events", "freshness_ms", "controls")}
    keys = ("latency_ms", "ok", "errors", "answers_on_a_rung")
    summary["rank"] = {k: result["rank_load"].get(k) for k in keys}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
