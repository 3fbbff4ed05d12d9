"""The request-time user tower: what one Rank pays for the user's learned vector.

    python -m benchmarks.user_tower --artifacts A [--calls 3000]

Per call, as ``ranker/stages.py`` ``request_vector`` does it: the catalog rows of
the user's recent items, the gather of their learned vectors, the ONNX Runtime
run on one thread. Warm-up first; users drawn at random (seeded) from the set's
user table; reports p50 / p95 / p99 and writes
``benchmarks/results/user_tower.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.harness import RESULTS, machine, pyplot
from ranker.user_tower import UserTower
from sieve import artifacts
from sieve.ids import IdIndex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    aset = artifacts.load(Path(args.artifacts))
    section = aset.manifest.retriever
    if section is None:
        raise SystemExit(f"{aset.root} has no learned retriever")
    tower = UserTower(str(aset.verified("user_tower")), section)
    tower.load()
    vectors = np.asarray(np.load(aset.verified("item_embeddings"), mmap_mode="r"))
    rows = IdIndex(aset.read_catalog(["item_id"])["item_id"].to_numpy(np.int64))
    users = pd.read_parquet(aset.verified("user_features"), columns=["recent_item_ids"])
    recent = [np.asarray(r, np.int64) for r in users["recent_item_ids"]]
    rng = np.random.default_rng(args.seed)
    picks = rng.integers(0, len(recent), args.calls + 200)
    times = []
    for n, i in enumerate(picks):
        t0 = time.perf_counter()
        r, found = rows.rows(recent[i])
        tower.vector(vectors[r[found]])
        if n >= 200:  # the first 200 warm up
            times.append((time.perf_counter() - t0) * 1e3)
    ms = np.array(times)
    latency = {
        p: round(float(np.percentile(ms, q)), 4)
        for p, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
    }
    result: dict[str, object] = {
        "machine": machine(),
        "artifact_version": aset.version,
        "items": int(aset.manifest.index.ntotal),
        "history": section.history,
        "dim": section.dim,
        "calls": len(ms),
        "latency_ms": latency,
        "threads": 1,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "user_tower.json").write_text(json.dumps(result, indent=2) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(ms, bins=60)
    ax.set_xlabel("ms per call (rows, gather, ONNX run; one thread)")
    ax.set_yscale("log")
    ax.set_title(
        f"user tower, {aset.manifest.index.ntotal:,} items, history {section.history}, "
        f"dim {section.dim}: p99 {latency['p99']:.3f} ms"
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "user_tower.png", dpi=110)
    print(json.dumps(latency))


if __name__ == "__main__":
    main()
