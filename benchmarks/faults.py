"""Fault injection under load: Rank keeps answering, says what it gave up, and
comes back to full quality once the fault clears.

    python -m benchmarks.faults                                  # 1M items, 5 Rank/s
    python -m benchmarks.faults --items 20000 --rate 10 --pre-s 2 --fault-s 3 \\
        --post-s 6                                               # the CI-sized run

Every part is a real process on loopback, as in ``benchmarks.latency_budget``
(whose work folder, synthetic set and saved Redis store it reuses):
``redis-server`` (online store, shown-history and response cache), the candidate
service, the ranker (talking to the candidate through ``DelayProxy``, which runs
in this process), and one load generator per fault at a steady ``--rate`` (half
the benchmark's maximum). For each fault: ``--pre-s`` seconds of load, the fault
for ``--fault-s`` seconds, then ``--post-s`` seconds after it clears:

- ``redis_kill``: SIGKILL redis-server; start it again (it loads its saved store);
- ``candidate_stop``: stop the candidate service (SIGTERM); start it again;
- ``candidate_slow``: 100 ms more on every candidate reply, then none;
- ``artifact_swap``: publish a new artifact version; both services go live with it;
- ``overload``: a second load generator brings the rate to 3x ``--max-rate``
  (the benchmark's highest rate within budget);
- ``shard_kill``: on a copy of the set resharded in two (``candidate.shards``),
  served by two candidate shard processes and a ranker of its own that scatters
  to both: SIGKILL shard 1; start it again on its port;
- ``cluster_master_kill``: on a copy of the set whose features Feast
  materialized into a local Redis Cluster (three masters, a replica each; the
  shown-history and response cache there too), served by a ranker of its own:
  SIGKILL a master; the fault clears once it is replaced: its replica promoted
  by the cluster's failover (node timeout 2 s) and the old node started again
  as a replica.

Per fault it records requests sent, OK, degraded (an answer that took a rung of
the degradation ladder), shed (RESOURCE_EXHAUSTED), failed (any other non-OK),
the p99 of the OK answers, and the seconds from the fault clearing (the restarted
process answering, the delay removed) to the last answer that was not full
quality. Writes ``RESULTS/faults.json`` and ``faults.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    RESULTS,
    ROOT,
    TOTAL_BUDGET_MS,
    bench_config,
    build_once,
    item_count,
    loadgen_command,
    machine,
    percentiles,
    pyplot,
    redis_port_of,
    reliability,
    serving,
    users_sample,
)
from sieve import artifacts
from sieve.faultproxy import DelayProxy
from sieve.local_redis import (
    LocalCluster,
    free_port,
    local_redis_cluster,
    start_redis,
    wait_for_redis,
)

FAULTS = ("redis_kill", "candidate_stop", "candidate_slow", "artifact_swap", "overload",
          "shard_kill", "cluster_master_kill")  # fmt: skip
CAUSES = {
    "redis_kill": ("user_features_failed", "history_unavailable"),
    "candidate_stop": ("retrieve_failed", "text_source_failed"),
    "candidate_slow": ("retrieve_failed", "text_source_failed"),
    "artifact_swap": ("retrieve_failed", "text_source_failed", "version_mismatch"),
    "overload": (),
    "shard_kill": ("partial_candidates", "retrieve_failed", "text_source_failed"),
    "cluster_master_kill": ("user_features_failed", "history_unavailable"),
}
"""The degradations each fault causes: recovery is judged on these (and on any
non-OK answer), not on rungs a busy machine takes anyway (``fewer_candidates``
when retrieval is slow), which are counted as ``degraded`` all the same."""


def fault_config(
    work: Path,
    redis_port: int,
    reload_s: float,
    max_in_flight: int | None = None,
    cpu_threads: int | None = None,
) -> Path:
    """The benchmark's production settings on Redis, the response cache there too,
    and the services looking for new sets every ``reload_s``; ``max_in_flight``
    and ``cpu_threads``: the ranker's, where not None."""
    extra = (
        f"\n[candidate]\nreload_check_s = {reload_s}\n\n"
        f"[ranker]\nreload_check_s = {reload_s}\n\n"
        f"{reliability(max_in_flight, cpu_threads)}\n"
        "[ranker.reliability.response_cache]\n"
        'store = "redis"\n'
        f'redis_url = "redis://127.0.0.1:{redis_port}/2"\n'
    )
    return bench_config(work, redis_port, extra, name="faults.toml")


def clone_version(root: Path, new: str) -> str:
    """Publish a copy of the live set as version ``new`` (a rebuilt set would
    look the same to the services); returns the version it replaced."""
    src = artifacts.resolve(root)
    artifacts.clone_version(src, root / "versions" / new, link=True)  # a 1M set is ~2 GB
    artifacts.publish(root, new)
    return src.name


class ProxyThread:
    """``DelayProxy`` on an event loop of its own thread, so this (blocking)
    driver can change its delay while it forwards."""

    def __init__(self, target: str) -> None:
        self.proxy = DelayProxy(target)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> int:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def summarize(
    events: list[list[Any]], inject: float, clear: float, causes: tuple[str, ...]
) -> dict[str, Any]:
    """The table row of one fault from the load generators' timelines.

    ``events``: [send time, latency ms, code, rungs, version, degradation kinds]
    per request; ``causes``: the degradation kinds the fault causes.
    """

    def hit(e: list[Any]) -> bool:  # failed, or degraded by this fault
        return bool(e[2] != "OK" or set(e[5].split("+")) & set(causes))

    codes = [e[2] for e in events]
    ok = [e for e in events if e[2] == "OK"]
    shed = [e for e in events if e[2] == "RESOURCE_EXHAUSTED"]
    shed_ms = [e[1] for e in shed]
    degraded = [e for e in ok if e[3]]
    during = [e for e in events if inject <= e[0] < clear]
    after = [e for e in events if e[0] >= clear]
    bad_after = [e for e in after if hit(e)]
    lat = percentiles([e[1] for e in ok] if ok else [0.0])
    shed_lat = percentiles(shed_ms) if shed else None
    ok_during = [e[1] for e in during if e[2] == "OK"]
    rungs: dict[str, int] = {}
    for e in degraded:
        for r in e[3].split("+"):
            rungs[r] = rungs.get(r, 0) + 1
    return {
        "sent": len(events),
        "ok": len(ok),
        "degraded": len(degraded),
        "shed": codes.count("RESOURCE_EXHAUSTED"),
        "failed": sum(c not in ("OK", "RESOURCE_EXHAUSTED") for c in codes),
        "failed_codes": sorted({c for c in codes if c not in ("OK", "RESOURCE_EXHAUSTED")}),
        "ok_p50_ms": lat["p50"],
        "ok_p99_ms": lat["p99"],
        "shed_p50_ms": shed_lat["p50"] if shed_lat else None,
        "shed_p99_ms": shed_lat["p99"] if shed_lat else None,
        "ok_p99_during_ms": percentiles(ok_during)["p99"] if ok_during else None,
        "degraded_during_fault": sum(1 for e in during if e[3]),
        "by_fault_during": sum(1 for e in during if hit(e)),
        "degraded_before": sum(1 for e in events if e[0] < inject and e[3]),
        "sent_before": sum(1 for e in events if e[0] < inject),
        "sent_during_fault": len(during),
        "fault_s": round(clear - inject, 2),
        "inject_unix_s": inject,
        "clear_unix_s": clear,
        "recovery_s": recovery_s(after, clear, hit),
        "last_hit_after_clear_s": round(max(e[0] for e in bad_after) - clear, 2)
        if bad_after
        else None,
        "unaffected_after": len(after) - len(bad_after),
        # answers after the last one the fault degraded: the run ended recovered
        "unaffected_at_end": sum(1 for e in after if e[0] > max(e[0] for e in bad_after))
        if bad_after
        else len(after),
        "sent_after": len(after),
        "rungs": rungs,
    }


RUN = 10
"""Recovered: the first of ``RUN`` answers in a row that the fault no longer hits."""


def recovery_s(
    after: list[list[Any]], clear: float, hit: Callable[[list[Any]], bool]
) -> float | None:
    """Seconds from ``clear`` to the send time of the first answer that starts a
    run of ``RUN`` unaffected answers (fewer if the run ends first); None if there
    is no such answer. An isolated hit later (a stall that times one call out) is
    reported in ``last_hit_after_clear_s``, not here."""
    streak = 0
    for i, e in enumerate(after):
        streak = 0 if hit(e) else streak + 1
        if streak == RUN or (streak and i == len(after) - 1):
            return round(max(0.0, after[i - streak + 1][0] - clear), 2)
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work).resolve()
    redis_port = redis_port_of(work)
    config = fault_config(work, redis_port, args.reload_s, args.max_in_flight, args.cpu_threads)
    root = work / "artifacts"
    redis_dir = work / "redis"
    rows: dict[str, Any] = {}
    with ExitStack() as stack:
        redis_proc = [start_redis(redis_port, redis_dir)]

        def stop_redis() -> None:
            redis_proc[0].terminate()
            redis_proc[0].wait(10)

        stack.callback(stop_redis)
        wait_for_redis(redis_proc[0], redis_port, args.start_timeout)
        build_once(root, args.items, config, f"127.0.0.1:{redis_port}")
        aset = artifacts.load(root)
        users = users_sample(aset, work)

        cport = free_port()  # fixed: the candidate restarts where the proxy points
        candidate = [ExitStack()]  # the running candidate process's exit

        def start_candidate() -> None:
            candidate[0] = ExitStack()
            candidate[0].enter_context(
                serving("candidate", config, root, work, "faults_candidate.log",
                        args.start_timeout, "--candidate-port", str(cport))
            )  # fmt: skip

        def stop_candidate() -> None:
            candidate[0].close()  # SIGTERM, and wait for it to exit

        start_candidate()
        stack.callback(stop_candidate)
        proxy = ProxyThread(f"127.0.0.1:{cport}")
        pport = proxy.start()
        stack.callback(proxy.stop)
        rproc, rport = stack.enter_context(
            serving("ranker", config, root, work, "faults_ranker.log", args.start_timeout,
                    "--ranker-port", "0", "--candidate-address", f"127.0.0.1:{pport}")
        )  # fmt: skip
        address = f"127.0.0.1:{rport}"

        def kill_redis() -> None:
            redis_proc[0].send_signal(signal.SIGKILL)
            redis_proc[0].wait(10)

        def restart_redis() -> None:
            redis_proc[0] = start_redis(redis_port, redis_dir)
            wait_for_redis(redis_proc[0], redis_port, args.start_timeout)

        def slow() -> None:
            proxy.proxy.delay_s = args.delay_ms / 1e3

        def fast() -> None:
            proxy.proxy.delay_s = 0.0

        versions: dict[str, str] = {}

        def swap() -> None:
            new = f"faults_{int(time.time())}"
            versions["old"], versions["new"] = clone_version(root, new), new

        def swapped() -> None:
            # the fault "clears" when answers carry the new version; wait for it
            deadline = time.monotonic() + args.fault_s + args.post_s
            user = int(np.loadtxt(users, dtype=np.int64, ndmin=1)[0])
            while time.monotonic() < deadline and not _serves(address, user, versions["new"]):
                time.sleep(0.1)

        extra: list[subprocess.Popen[bytes]] = []

        def overload() -> None:
            out = work / "faults_overload_extra.json"
            extra_rate = 3 * args.max_rate - args.rate
            cmd = loadgen_command(address, extra_rate, args.fault_s, 0.0, users, out, seed=77)
            extra.append(subprocess.Popen([*cmd, "--timeline"], cwd=ROOT))

        def overload_end() -> None:
            if extra:
                extra[0].wait(60 + args.fault_s)

        shard_procs: list[ExitStack] = []  # each shard process's exit
        shard_popen: list[subprocess.Popen[bytes]] = []
        shard_ports: list[int] = []
        sharded: dict[str, Any] = {}

        def start_shard(i: int) -> None:
            shard_procs[i] = ExitStack()
            shard_popen[i], _ = shard_procs[i].enter_context(
                serving("candidate", config, sharded["root"], work, f"faults_shard{i}.log",
                        args.start_timeout, "--candidate-port", str(shard_ports[i]),
                        "--shard", str(i), ready_name=f"shard{i}")
            )  # fmt: skip

        def stop_shard(i: int) -> None:
            shard_procs[i].close()

        def sharded_ranker() -> str:
            """A ranker over two candidate shards of a resharded copy of the set."""
            from candidate.shards import reshard

            sroot = work / "sharded"
            if sroot.exists():
                shutil.rmtree(sroot)
            src = artifacts.resolve(root)
            artifacts.clone_version(src, sroot / "versions" / src.name, link=True)
            reshard(sroot, src.name, f"{src.name[:50]}_s2", 2)
            artifacts.publish(sroot, f"{src.name[:50]}_s2")
            sharded["root"] = sroot
            for i in range(2):
                shard_procs.append(ExitStack())
                shard_ports.append(free_port())
                shard_popen.append(None)  # type: ignore[arg-type]  # set by start_shard
                start_shard(i)
                stack.callback(stop_shard, i)
            _, port = stack.enter_context(
                serving("ranker", config, sroot, work, "faults_ranker_sharded.log",
                        args.start_timeout, "--ranker-port", "0",
                        *(a for p in shard_ports for a in ("--candidate-shard", f"127.0.0.1:{p}")),
                        ready_name="ranker_sharded")
            )  # fmt: skip
            return f"127.0.0.1:{port}"

        clusters: list[LocalCluster] = []
        failover: dict[str, Any] = {}

        def master_killed() -> None:
            clusters[0].kill(0)
            failover["killed"] = time.time()

        def master_replaced() -> None:
            """The fault clears when the killed master is replaced: its replica
            promoted (the cluster's own failover) and the old node back as a
            replica."""
            cl = clusters[0]
            cl.wait_role(failover["replica"], "master")
            failover["promoted_after_s"] = round(time.time() - failover["killed"], 2)
            cl.restart(0)
            cl.wait_role(0, "slave")

        def clustered_ranker() -> str:
            """A ranker over a copy of the set whose online store is a local Redis
            Cluster (its shown-history and response cache there too)."""
            from features.config import RedisStoreConfig
            from features.materialize import materialize_into

            cl = stack.enter_context(local_redis_cluster(work / "cluster_nodes", 3, replicas=1))
            clusters.append(cl)
            failover["replica"] = cl.replica_of(0)
            croot = work / "clustered"
            if croot.exists():
                shutil.rmtree(croot)
            src = artifacts.resolve(root)
            m = artifacts.load(root).manifest
            dest = croot / "versions" / src.name
            shutil.copytree(
                src, dest, copy_function=os.link, ignore=shutil.ignore_patterns("feature_repo")
            )
            online = RedisStoreConfig(connection_string=cl.nodes[0], redis_type="redis_cluster")
            materialize_into(
                src / "feature_repo", dest / "feature_repo", m.feature_schema.project, online
            )
            roles = ("feature_store", "user_features", "item_features")
            files = {r: artifacts.file_entry(dest, m.files[r].path) for r in roles}
            artifacts.write_manifest(dest, m.model_copy(update={"files": {**m.files, **files}}))
            artifacts.publish(croot, src.name)
            url = f"redis://{cl.nodes[0]}/0"
            ccfg = work / "faults_cluster.toml"
            ccfg.write_text(
                f'[ranker.rerank.history]\nstore = "redis"\nredis_url = "{url}"\n'
                "redis_cluster = true\n"
                f"{reliability(args.max_in_flight, args.cpu_threads)}\n"
                f'[ranker.reliability.response_cache]\nstore = "redis"\nredis_url = "{url}"\n'
                "redis_cluster = true\n"
            )
            _, port = stack.enter_context(
                serving("ranker", ccfg, croot, work, "faults_ranker_cluster.log",
                        args.start_timeout, "--ranker-port", "0", "--candidate-address",
                        f"127.0.0.1:{cport}", ready_name="ranker_cluster")
            )  # fmt: skip
            return f"127.0.0.1:{port}"

        def kill_shard() -> None:
            shard_popen[1].send_signal(signal.SIGKILL)
            shard_popen[1].wait(10)
            shard_procs[1].close()  # reaped already: nothing left to stop

        plan: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
            "redis_kill": (kill_redis, restart_redis),
            "candidate_stop": (stop_candidate, start_candidate),
            "candidate_slow": (slow, fast),
            "artifact_swap": (swap, swapped),
            "overload": (overload, overload_end),
            "shard_kill": (kill_shard, lambda: start_shard(1)),
            "cluster_master_kill": (master_killed, master_replaced),
        }
        for i, name in enumerate(args.faults.split(",")):
            inject_fn, clear_fn = plan[name]
            extra.clear()
            out, started = work / f"faults_{name}.json", work / f"faults_{name}.started"
            started.unlink(missing_ok=True)
            total = args.pre_s + args.fault_s + args.post_s
            target = address
            if name == "shard_kill":
                target = sharded_ranker()
            elif name == "cluster_master_kill":
                target = clustered_ranker()
            cmd = loadgen_command(target, args.rate, total, args.warmup, users, out, seed=i)
            gen = subprocess.Popen(
                [*cmd, "--timeline", "--started-file", str(started)], cwd=ROOT
            )  # fmt: skip
            while not started.exists():
                if gen.poll() is not None:
                    raise RuntimeError(f"load generator for {name} exited early")
                time.sleep(0.05)
            t0 = float(started.read_text())
            time.sleep(max(0.0, t0 + args.warmup + args.pre_s - time.time()))
            inject = time.time()
            inject_fn()
            time.sleep(max(0.0, inject + args.fault_s - time.time()))
            clear_fn()
            clear = time.time()
            if gen.wait(120 + total) != 0:
                raise RuntimeError(f"load generator for {name} failed")
            events = json.loads(out.read_text())["timeline"]
            if name == "overload" and extra:
                events += json.loads((work / "faults_overload_extra.json").read_text())["timeline"]
            row = summarize(events, inject, clear, CAUSES[name])
            row["offered_rps"] = 3 * args.max_rate if name == "overload" else args.rate
            if name == "shard_kill":
                during = [e for e in events if inject <= e[0] < clear and e[2] == "OK"]
                row["partial_during_fault"] = sum("partial_candidates" in e[3] for e in during)
                row["sharded_set"] = artifacts.current_version(sharded["root"])
            if name == "cluster_master_kill":
                # the killed master came back as its replica's replica
                row["roles_after"] = [clusters[0].role(i) for i in range(len(clusters[0].ports))]
                row["replica_promoted_after_s"] = failover["promoted_after_s"]
            if name == "artifact_swap":
                row["versions"] = dict(versions)
                row["answers_of_new_version"] = sum(e[4] == versions["new"] for e in events)
            rows[name] = {**row, "timeline": events}
            print(
                f"{name:<15} sent {row['sent']:>5} ok {row['ok']:>5} degraded "
                f"{row['degraded']:>4} shed {row['shed']:>3} failed {row['failed']:>3}  "
                f"p99(ok) {row['ok_p99_ms']:7.1f} ms  recovery {row['recovery_s']} s"
                + (
                    f"  shed p50 {row['shed_p50_ms']:.1f} p99 {row['shed_p99_ms']:.1f} ms"
                    if row["shed"]
                    else ""
                ),
                flush=True,
            )
            if rproc.poll() is not None:
                raise RuntimeError("the ranker exited during the fault run")
    return {
        "machine": machine(),
        "items": item_count(aset),
        "artifact_version": aset.version,
        "settings": {
            "rate_rps": args.rate,
            "max_rate_rps": args.max_rate,
            "pre_s": args.pre_s,
            "fault_s": args.fault_s,
            "post_s": args.post_s,
            "delay_ms": args.delay_ms,
            "max_in_flight": args.max_in_flight or "default",
            "cpu_threads": "default" if args.cpu_threads is None else args.cpu_threads,
            "processes": "redis-server, candidate, ranker (candidate via a delay proxy), "
            "load generator per fault (a second one for overload); for shard_kill, two "
            "candidate shards of a resharded copy of the set and a ranker over them; for "
            "cluster_master_kill, a 3-master Redis Cluster with a replica each and a ranker "
            "over a copy of the set materialized there",
            "degraded": "an OK answer that took a rung of the degradation ladder",
            "recovery_s": f"from the fault clearing to the first of {RUN} answers in a row "
            "that the fault no longer degraded (its degradation kinds: causes) and that did "
            "not fail; last_hit_after_clear_s: the last answer it still hit",
            "causes": CAUSES,
        },
        "faults": rows,
    }


def _serves(address: str, user: int, version: str) -> bool:
    import grpc

    from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            resp = sieve_pb2_grpc.RankerServiceStub(ch).Rank(
                sieve_pb2.RankRequest(user_id=user, k=1), timeout=5
            )
        except grpc.RpcError:
            return False
    return bool(resp.artifact_version == version)


def plot(result: dict[str, Any], out_dir: Path) -> None:
    plt = pyplot()
    faults = result["faults"]
    fig, axes = plt.subplots(len(faults), 1, figsize=(9, 2.2 * len(faults)), squeeze=False)
    for ax, (name, row) in zip(axes[:, 0], faults.items(), strict=True):
        ev = row["timeline"]
        t0 = ev[0][0] if ev else 0.0
        for label, color, pick in (
            ("full quality", "C0", lambda e: e[2] == "OK" and not e[3]),
            ("degraded", "C1", lambda e: e[2] == "OK" and e[3]),
            ("shed", "C7", lambda e: e[2] == "RESOURCE_EXHAUSTED"),
            ("failed", "red", lambda e: e[2] not in ("OK", "RESOURCE_EXHAUSTED")),
        ):
            pts = [(e[0] - t0, e[1]) for e in ev if pick(e)]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.scatter(x, y, s=6, color=color, label=label)
        start = result["settings"]["pre_s"]
        ax.axvspan(start, start + row["fault_s"], color="red", alpha=0.08)
        ax.axhline(TOTAL_BUDGET_MS, color="red", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(
            f"{name}: {row['ok']}/{row['sent']} OK, {row['degraded']} degraded, "
            f"{row['failed']} failed, recovery {row['recovery_s']} s",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the load started (fault shaded)")
    fig.tight_layout()
    fig.savefig(out_dir / "faults.png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--work", help="kept between runs (default .bench/latency_ITEMS)")
    ap.add_argument("--rate", type=float, default=5.0, help="steady Rank/s (Poisson)")
    ap.add_argument(
        "--max-rate", type=float, default=10.0, help="latency benchmark's max (overload: 3x)"
    )
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--pre-s", type=float, default=5.0)
    ap.add_argument("--fault-s", type=float, default=10.0)
    ap.add_argument("--post-s", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--delay-ms", type=float, default=100.0)
    ap.add_argument("--reload-s", type=float, default=1.0, help="services' reload check")
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--max-in-flight", type=int, help="ranker.reliability.max_in_flight")
    ap.add_argument("--cpu-threads", type=int, help="ranker.reliability.cpu_threads")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    args.work = args.work or str(ROOT / ".bench" / f"latency_{args.items}")
    result = run(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out)
    slim = {**result, "faults": {k: {**v, "timeline": None} for k, v in result["faults"].items()}}
    for v in slim["faults"].values():
        v.pop("timeline")
    (out / "faults.json").write_text(json.dumps(slim, indent=1) + "\n")
    print(f"wrote {out / 'faults.json'} and faults.png")


if __name__ == "__main__":
    main()
