"""Funnel benchmark: Rank stage latencies over gRPC, and feature reads side by side.

    python -m benchmarks.funnel --artifacts artifacts [--requests 500] [--concurrency 1,8]

Serves the artifact set in this process (candidate + ranker on loopback ports),
warms up, then for each concurrency level sends ``--requests`` Rank calls for
random known users and reports p50/p95/p99 per stage (server-side, from the
response) and client round trip. Then it reads 1 user + 1000 items with our
online reader and with Feast's ``get_online_features``, alternating, and reports
both with their ratio. Writes ``benchmarks/results/funnel.json`` and ``.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.harness import RESULTS, machine, percentiles, pyplot  # noqa: E402
from candidate.config import CandidateConfig  # noqa: E402
from features.definitions import ITEM_VIEW, user_view  # noqa: E402
from features.reader import open_reader  # noqa: E402
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc  # noqa: E402
from ranker.config import RankerConfig, ReliabilityConfig, StageBudgetMs  # noqa: E402
from sieve import artifacts  # noqa: E402
from sieve.local_redis import local_redis  # noqa: E402


async def _worker(
    stub: sieve_pb2_grpc.RankerServiceStub,
    todo: list[int],
    stages: dict[str, list[float]],
    client: list[float],
) -> None:
    """One closed-loop client: takes users off ``todo`` until it is empty."""
    while todo:
        user = todo.pop()
        t0 = time.perf_counter()
        resp = await stub.Rank(sieve_pb2.RankRequest(user_id=user))
        client.append((time.perf_counter() - t0) * 1e3)
        if resp.degradations:
            raise RuntimeError(f"degraded answer: {list(resp.degradations)}")
        for t in resp.timings:
            stages.setdefault(t.stage, []).append(t.micros / 1e3)


async def bench_rank(root: Path, requests: int, levels: list[int], seed: int) -> dict[str, Any]:
    from candidate.service import create_server as create_candidate
    from ranker.service import create_server as create_ranker

    aset = artifacts.load(root)
    users = pd.read_parquet(aset.verified("user_features"), columns=["user_id"])["user_id"]
    rng = np.random.default_rng(seed)
    cserver, _ = await create_candidate(CandidateConfig(port=0), root)
    # What each stage costs under closed-loop concurrency: no deadline may cut a
    # stage short (the degradation ladder is measured in benchmarks/faults.py).
    no_deadlines = ReliabilityConfig(budget_ms=StageBudgetMs(headroom=60_000.0), max_in_flight=4096)
    rcfg = RankerConfig(
        port=0,
        candidate_address=f"127.0.0.1:{cserver.port}",
        item_refresh_s=0,
        reliability=no_deadlines,
    )
    rserver, _ = await create_ranker(rcfg, root)
    out: dict[str, Any] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rserver.port}") as ch:
            stub = sieve_pb2_grpc.RankerServiceStub(ch)
            for _ in range(50):  # warm-up
                await stub.Rank(sieve_pb2.RankRequest(user_id=int(rng.choice(users))))
            for level in levels:
                stages: dict[str, list[float]] = {}
                client: list[float] = []
                todo = [int(u) for u in rng.choice(users, requests)]

                t0 = time.perf_counter()
                await asyncio.gather(*(_worker(stub, todo, stages, client) for _ in range(level)))
                wall = time.perf_counter() - t0
                out[f"concurrency_{level}"] = {
                    "stages_ms": {s: percentiles(v) for s, v in stages.items()},
                    "client_round_trip_ms": percentiles(client),
                    "throughput_rps": requests / wall,
                }
    finally:
        await rserver.stop(0)
        await cserver.stop(0)
    return out


@contextlib.contextmanager
def redis_repo(aset: artifacts.ArtifactSet, workdir: Path) -> Iterator[Path]:
    """A local redis-server with this set's features applied and materialized."""
    from features.config import RedisStoreConfig
    from features.materialize import materialize_into

    with local_redis() as address:
        repo = workdir / "redis_repo"
        materialize_into(
            aset.verified("feature_store").parent,
            repo,
            aset.manifest.feature_schema.project,
            RedisStoreConfig(connection_string=address),
        )
        yield repo


async def bench_features(root: Path, repo: Path, rounds: int, seed: int) -> dict[str, Any]:
    from feast import FeatureStore

    aset = artifacts.load(root)
    users = pd.read_parquet(aset.verified("user_features"), columns=["user_id"])["user_id"]
    items = pd.read_parquet(aset.verified("item_features"), columns=["item_id"])["item_id"]
    store = FeatureStore(repo_path=str(repo))
    reader = open_reader(repo)
    await reader.start()
    gc.collect()
    gc.freeze()  # as the serving processes do after start-up
    rng = np.random.default_rng(seed)
    ours: list[float] = []
    feast: list[float] = []
    user_view_ = user_view(aset.manifest.index.dim)
    refs_u = [f"{user_view_.name}:{f.name}" for f in user_view_.features]
    refs_i = [f"{ITEM_VIEW.name}:{f.name}" for f in ITEM_VIEW.features]
    try:
        for r in range(rounds + 3):  # the first 3 rounds are warm-up
            u = np.array([rng.choice(users)])
            ids = rng.choice(items, 1000, replace=False)
            t0 = time.perf_counter()
            await reader.read(user_view_, u)
            await reader.read(ITEM_VIEW, ids)
            t1 = time.perf_counter()
            store.get_online_features(features=refs_u, entity_rows=[{"user_id": int(u[0])}])
            store.get_online_features(
                features=refs_i, entity_rows=[{"item_id": int(i)} for i in ids]
            )
            t2 = time.perf_counter()
            if r >= 3:
                ours.append((t1 - t0) * 1e3)
                feast.append((t2 - t1) * 1e3)
    finally:
        await reader.close()
    o, f = percentiles(ours), percentiles(feast)
    return {
        "store": type(reader).__name__,
        "what": "1 user + 1000 items, all features",
        "ours_ms": o,
        "feast_sdk_ms": f,
        "speedup_p50": f["p50"] / o["p50"],
        "in_process_item_table": "the serving path gathers item rows from memory instead",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    levels = [k for k in result["rank"] if k.startswith("concurrency_")]
    stages = [s for s in result["rank"][levels[0]]["stages_ms"] if s != "total"] + ["total"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(levels)
    for j, level in enumerate(levels):
        st = result["rank"][level]["stages_ms"]
        x = np.arange(len(stages)) + j * width
        axes[0].bar(x, [st[s]["p50"] for s in stages], width, label=f"{level} p50")
        axes[0].scatter(x, [st[s]["p99"] for s in stages], marker="_", s=200, color="k")
    axes[0].set_xticks(np.arange(len(stages)) + width * (len(levels) - 1) / 2, stages, rotation=30)
    axes[0].set_ylabel("ms (bars p50, ticks p99)")
    axes[0].set_title("Rank, server-side stage times")
    axes[0].legend()
    names, pos = [], 0
    for fr in result["features"]:
        store = fr["store"].replace("Reader", "")
        for i, (key, who) in enumerate((("ours_ms", "sieve"), ("feast_sdk_ms", "Feast SDK"))):
            axes[1].bar(pos, fr[key]["p50"], color=f"C{i}")
            axes[1].scatter(pos, fr[key]["p99"], marker="_", s=400, color="k")
            names.append(
                f"{who}\n{store}\n({fr['speedup_p50']:.1f}x)" if i == 0 else f"{who}\n{store}"
            )
            pos += 1
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_ylabel("ms (bar p50, tick p99)")
    axes[1].set_title("features of 1 user + 1000 items")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--feature-rounds", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="funnel")
    p.add_argument("--no-redis", action="store_true", help="skip the Redis feature read")
    args = p.parse_args()
    root = Path(args.artifacts)
    levels = [int(x) for x in args.concurrency.split(",")]
    aset = artifacts.load(root)
    result: dict[str, Any] = {
        "artifact_version": aset.version,
        "machine": machine(),
        "rank": asyncio.run(bench_rank(root, args.requests, levels, args.seed)),
        "features": [
            asyncio.run(
                bench_features(
                    root, aset.verified("feature_store").parent, args.feature_rounds, args.seed
                )
            )
        ],
    }
    if not args.no_redis and shutil.which("redis-server"):
        with tempfile.TemporaryDirectory() as tmp, redis_repo(aset, Path(tmp)) as repo:
            result["features"].append(
                asyncio.run(bench_features(root, repo, args.feature_rounds, args.seed))
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{args.name}.png")
    for level in levels:
        r = result["rank"][f"concurrency_{level}"]
        print(f"\nconcurrency {level}: {r['throughput_rps']:.0f} req/s")
        for s, v in r["stages_ms"].items():
            print(f"  {s:<14} p50 {v['p50']:7.2f}  p95 {v['p95']:7.2f}  p99 {v['p99']:7.2f} ms")
        c = r["client_round_trip_ms"]
        print(
            f"  {'client rtt':<14} p50 {c['p50']:7.2f}  p95 {c['p95']:7.2f}  p99 {c['p99']:7.2f} ms"
        )
    for fr in result["features"]:
        print(
            f"\nfeature read, {fr['what']} ({fr['store']}): sieve p50 {fr['ours_ms']['p50']:.2f}"
            f" / p99 {fr['ours_ms']['p99']:.2f} ms; Feast SDK p50 {fr['feast_sdk_ms']['p50']:.2f}"
            f" / p99 {fr['feast_sdk_ms']['p99']:.2f} ms; {fr['speedup_p50']:.1f}x at p50"
        )
    print(f"wrote {RESULTS / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
