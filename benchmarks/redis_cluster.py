"""The online-store read on a Redis Cluster against one Redis node, side by side.

    python -m benchmarks.redis_cluster --artifacts A [--reads 500] [--items 1000]

The live set's feature tables (under ``A``) are applied and materialized by Feast
into a fresh single ``redis-server`` and into a fresh local cluster of three
masters (``sieve.local_redis``), both on loopback. Then the ranker's reader
(``features.reader``) reads ``--items`` random item ids a call from each,
alternating call by call after a warm-up, and the user features of one user;
p50/p95/p99 per store. Writes ``benchmarks/results/redis_cluster.json`` and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.harness import RESULTS, machine, percentiles, pyplot
from features.config import RedisStoreConfig
from features.definitions import ITEM_VIEW, USER_VIEW
from features.materialize import materialize_into
from features.reader import OnlineReader, open_reader
from sieve import artifacts
from sieve.local_redis import local_redis, local_redis_cluster


async def measure(
    readers: dict[str, OnlineReader], item_ids: np.ndarray, user_ids: np.ndarray, args: Any
) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    for r in readers.values():
        await r.start()
    lat: dict[str, dict[str, list[float]]] = {n: {"items": [], "user": []} for n in readers}
    try:
        for i in range(args.warmup + args.reads):
            ids = rng.choice(item_ids, args.items, replace=False)
            user = rng.choice(user_ids, 1)
            order = list(readers.items()) if i % 2 == 0 else list(readers.items())[::-1]
            for name, reader in order:
                t0 = time.perf_counter()
                frame = await reader.read(ITEM_VIEW, ids)
                t1 = time.perf_counter()
                await reader.read(USER_VIEW, user)
                t2 = time.perf_counter()
                if i >= args.warmup:
                    assert frame.found.all(), name
                    lat[name]["items"].append((t1 - t0) * 1e3)
                    lat[name]["user"].append((t2 - t1) * 1e3)
    finally:
        for r in readers.values():
            await r.close()
    return {n: {k: percentiles(v) for k, v in d.items()} for n, d in lat.items()}


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(result["latency_ms"])
    x = np.arange(len(names))
    for off, p in ((-0.25, "p50"), (0.0, "p95"), (0.25, "p99")):
        ax.bar(x + off, [result["latency_ms"][n]["items"][p] for n in names], 0.25, label=p)
    ax.set_xticks(x, names)
    ax.set_ylabel(f"ms to read {result['items_per_read']} items")
    ax.set_title("online-store read: one Redis node vs a 3-master cluster", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", required=True, help="an artifact root (its live set's tables)")
    ap.add_argument("--reads", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--items", type=int, default=1000, help="item ids per read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="redis_cluster")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    aset = artifacts.load(Path(args.artifacts))
    src = aset.verified("feature_store").parent
    project = aset.manifest.feature_schema.project
    data = src / "data"
    item_ids = pd.read_parquet(data / "item_features.parquet", columns=["item_id"])["item_id"]
    user_ids = pd.read_parquet(data / "user_features.parquet", columns=["user_id"])["user_id"]
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_redis() as single,
        local_redis_cluster(Path(tmp) / "cluster") as cluster,
    ):
        t0 = time.perf_counter()
        materialize_into(
            src, Path(tmp) / "single", project, RedisStoreConfig(connection_string=single)
        )
        t1 = time.perf_counter()
        materialize_into(
            src,
            Path(tmp) / "cluster_repo",
            project,
            RedisStoreConfig(connection_string=cluster.nodes[0], redis_type="redis_cluster"),
        )
        t2 = time.perf_counter()
        readers = {
            "single": open_reader(Path(tmp) / "single"),
            "cluster3": open_reader(Path(tmp) / "cluster_repo"),
        }
        lat = asyncio.run(
            measure(readers, item_ids.to_numpy(np.int64), user_ids.to_numpy(np.int64), args)
        )
    result = {
        "set": aset.version,
        "n_items": len(item_ids),
        "items_per_read": args.items,
        "reads": args.reads,
        "materialize_s": {"single": round(t1 - t0, 1), "cluster3": round(t2 - t1, 1)},
        "latency_ms": lat,
        "machine": machine(),
        "setup": "redis-server 7 on loopback: one node, and 3 masters without replicas "
        "(redis-cli --cluster create); reads alternate store by store, one at a time",
    }
    for name, d in lat.items():
        print(
            f"{name:<9} {args.items} items p50 {d['items']['p50']:.2f} p95 {d['items']['p95']:.2f} "
            f"p99 {d['items']['p99']:.2f} ms; one user p99 {d['user']['p99']:.2f} ms"
        )
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{args.name}.png")
    print(f"wrote {out / args.name}.json and .png")


if __name__ == "__main__":
    main()
