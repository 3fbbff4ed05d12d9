"""Scoring 1000-row requests with cross-request batching off and on, side by side.

    python -m benchmarks.score_batching --artifacts artifacts [--requests 2000]

Loads the artifact set's ranking model in ONNX Runtime (the service's thread
settings) and, for 1, 8 and 32 concurrent callers, scores ``--requests`` blocks
of 1000 rows either directly (what the ranker does with batching off) or through
the MicroBatcher (on). Also times one model call on 1000 x m rows against m calls
of 1000 rows. Reports throughput and p50/p95/p99 per request; writes
``benchmarks/results/score_batching.{json,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import percentiles, plot_on_off
from ranker.features import MODEL_FEATURES
from ranker.pipeline import score_batch
from ranker.scorer import OnnxScorer, providers
from sieve import artifacts
from sieve.batcher import MicroBatcher

RESULTS = Path(__file__).resolve().parent / "results"


async def drive(score, blocks: list[np.ndarray], level: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    lat: list[float] = []
    todo = list(blocks)

    async def caller() -> None:
        while todo:
            x = todo.pop()
            t0 = time.perf_counter()
            await score(x)
            lat.append((time.perf_counter() - t0) * 1e3)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(level)))
    return {"rps": len(blocks) / (time.perf_counter() - t0), **percentiles(lat)}


async def run(scorer: OnnxScorer, n: int, levels: list[int], wait_us: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(1000, len(MODEL_FEATURES))).astype(np.float32) for _ in range(64)]
    work = [blocks[i % len(blocks)] for i in range(n)]
    batcher: MicroBatcher[tuple[OnnxScorer, np.ndarray], np.ndarray] = MicroBatcher(
        score_batch, 32, wait_us, 4096
    )
    batcher.start()

    async def off(x: np.ndarray) -> np.ndarray:
        return scorer.score(x)

    async def on(x: np.ndarray) -> np.ndarray:
        return await batcher.submit((scorer, x))

    out: dict[str, Any] = {}
    for level in levels:
        row: dict[str, Any] = {}
        for name, fn in (("off", off), ("on", on)):
            await drive(fn, work[:100], level)  # warm-up
            batcher.batch_sizes.clear()
            row[name] = await drive(fn, work, level)
            if name == "on":
                row[name]["mean_batch"] = float(np.mean(batcher.batch_sizes))
        row["rps_ratio_on_off"] = row["on"]["rps"] / row["off"]["rps"]
        out[f"concurrency_{level}"] = row
        off_, on_ = row["off"], row["on"]
        print(
            f"concurrency {level:>3}: "
            f"off {off_['rps']:6.0f} req/s p50 {off_['p50']:6.3f} p99 {off_['p99']:6.3f} ms | "
            f"on {on_['rps']:6.0f} req/s p50 {on_['p50']:6.3f} p99 {on_['p99']:6.3f} ms, "
            f"mean batch {on_['mean_batch']:.1f} | on/off {row['rps_ratio_on_off']:.2f}x"
        )
    await batcher.stop()
    return out


def call_sizes(scorer: OnnxScorer, sizes: list[int], repeats: int = 50) -> dict[str, Any]:
    """Median ms of one call on m x 1000 rows, and per 1000 rows."""
    rng = np.random.default_rng(1)
    out = {}
    for m in sizes:
        x = rng.normal(size=(1000 * m, len(MODEL_FEATURES))).astype(np.float32)
        for _ in range(5):
            scorer.score(x)
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            scorer.score(x)
            t.append((time.perf_counter() - t0) * 1e3)
        med = float(np.median(t))
        out[str(1000 * m)] = {"median_ms": med, "ms_per_1000_rows": med / m}
        print(f"one call, {1000 * m:>6} rows: {med:7.3f} ms ({med / m:.3f} ms per 1000 rows)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-wait-us", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = ap.parse_args()
    aset = artifacts.load(Path(args.artifacts))
    m = aset.manifest["model"]
    scorer = OnnxScorer(
        str(aset.verified("model")), m["input_name"], m["output_name"], m["features"], args.threads
    )
    scorer.load()
    sizes = call_sizes(scorer, [1, 4, 8, 32])
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = asyncio.run(run(scorer, args.requests, levels, args.max_wait_us))
    result = {
        "artifact_version": aset.version,
        "model": m.get("kind"),
        "providers": providers(),
        "intra_op_threads": args.threads,
        "max_wait_us": args.max_wait_us,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "call_sizes": sizes,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "score_batching.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_on_off(
        rows,
        RESULTS / "score_batching.png",
        "1000-row requests scored / s",
        f"Scoring, {result['providers'][0]}, {args.threads} intra-op thread",
    )
    print(f"wrote {RESULTS / 'score_batching.json'} and .png")


if __name__ == "__main__":
    main()
