"""Retrieve with micro-batching off and on, side by side, at several concurrencies.

    python -m benchmarks.retrieve_batching --artifacts artifacts [--requests 600]

Starts two candidate servers on one artifact set (batching off / on, the same
Faiss thread count), warms both, then for each concurrency level drives each
with closed-loop clients calling Retrieve(user_id, k=1000, the user's seen items
excluded) and reports throughput, client p50/p95/p99 and the mean batch size.
Clients and servers share this process, so absolute figures include the
client's own overhead; the on/off ratio is the point. Writes
``benchmarks/results/retrieve_batching.{json,png}``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.harness import RESULTS, machine, percentiles, plot_on_off  # noqa: E402
from candidate.config import CandidateConfig  # noqa: E402
from candidate.service import create_server  # noqa: E402
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc  # noqa: E402
from sieve import artifacts  # noqa: E402


async def drive(address: str, reqs: list[sieve_pb2.RetrieveRequest], level: int) -> dict[str, Any]:
    lat: list[float] = []
    todo = list(reqs)

    async def client(stub: sieve_pb2_grpc.CandidateServiceStub) -> None:
        while todo:
            req = todo.pop()
            t0 = time.perf_counter()
            await stub.Retrieve(req, timeout=60)
            lat.append((time.perf_counter() - t0) * 1e3)

    async with grpc.aio.insecure_channel(address) as ch:
        stub = sieve_pb2_grpc.CandidateServiceStub(ch)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(stub) for _ in range(level)))
        wall = time.perf_counter() - t0
    return {"rps": len(reqs) / wall, **percentiles(lat)}


async def run(root: Path, n: int, levels: list[int], threads: int, seed: int) -> dict[str, Any]:
    aset = artifacts.load(root)
    users = pd.read_parquet(aset.verified("user_features"), columns=["user_id", "seen_item_ids"])
    rng = np.random.default_rng(seed)
    servers = {}
    for mode in ("off", "on"):
        cfg = CandidateConfig(port=0, batching=mode, omp_threads=threads, reload_check_s=0)
        servers[mode] = await create_server(cfg, root)
    out: dict[str, Any] = {}
    try:
        for level in levels:
            picks = users.iloc[rng.integers(0, len(users), n)]
            reqs = [
                sieve_pb2.RetrieveRequest(user_id=int(u), k=1000, exclude_item_ids=s)
                for u, s in zip(picks["user_id"], picks["seen_item_ids"], strict=True)
            ]
            row: dict[str, Any] = {}
            for mode in ("off", "on"):
                server, servicer = servers[mode]
                await drive(f"127.0.0.1:{server.port}", reqs[:50], level)  # warm-up
                if servicer.batcher is not None:
                    servicer.batcher.batch_sizes.clear()
                row[mode] = await drive(f"127.0.0.1:{server.port}", reqs, level)
                if servicer.batcher is not None:
                    row[mode]["mean_batch"] = float(np.mean(servicer.batcher.batch_sizes))
            row["rps_ratio_on_off"] = row["on"]["rps"] / row["off"]["rps"]
            out[f"concurrency_{level}"] = row
            print(
                f"concurrency {level:>3}: off {row['off']['rps']:7.0f} req/s p50 "
                f"{row['off']['p50']:6.2f} p99 {row['off']['p99']:6.2f} ms | on "
                f"{row['on']['rps']:7.0f} req/s p50 {row['on']['p50']:6.2f} p99 "
                f"{row['on']['p99']:6.2f} ms, mean batch {row['on'].get('mean_batch', 0):.1f} "
                f"| on/off {row['rps_ratio_on_off']:.2f}x"
            )
    finally:
        for server, _ in servers.values():
            await server.stop(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="retrieve_batching")
    args = ap.parse_args()
    root = Path(args.artifacts)
    aset = artifacts.load(root)
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = asyncio.run(run(root, args.requests, levels, args.threads, args.seed))
    result = {
        "artifact_version": aset.version,
        "index": aset.manifest.index.factory,
        "search_params": aset.manifest.index.search_params,
        "ntotal": aset.manifest.index.ntotal,
        "faiss_threads": args.threads,
        "machine": machine(),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_on_off(
        rows,
        RESULTS / f"{args.name}.png",
        "Retrieve calls / s",
        f"Retrieve k=1000, {result['index']} ({result['ntotal']:,} items), CPU",
    )
    print(f"wrote {RESULTS / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
