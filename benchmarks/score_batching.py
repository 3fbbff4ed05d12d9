"""Scoring 1000-row requests: teacher vs student vs INT8, batching off and on.

    python -m benchmarks.score_batching --artifacts artifacts [--requests 2000]

Loads the artifact set's models in ONNX Runtime (the service's thread settings).
First the cost of one 1000-row call for the DCN-v2 teacher, the served student
(FP32) and its INT8 twin, side by side (median, p99 and the ratios). Then, for
the student in FP32 and INT8 and for 1, 8 and 32 concurrent callers, scores
``--requests`` blocks of 1000 rows either directly (what the ranker does with
batching off), through the MicroBatcher (on), through a MicroBatcher with two
batches in flight at once (``on_overlapped``: one per core here), or each on a
pool of two worker threads; and one model call on 1000 x m rows against m calls
of 1000 rows. Reports throughput and p50/p95/p99 per
request; writes ``benchmarks/results/score_batching.{json,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS, machine, percentiles, plot_on_off
from ranker.device import onnx_cuda, providers
from ranker.features import MODEL_FEATURES
from ranker.scorer import OnnxScorer
from ranker.stages import score_batch
from sieve import artifacts
from sieve.batcher import MicroBatcher
from sieve.device import decide

OVERLAPPED_MAX_BATCH = 4
"""Requests per batch of the overlapped variant: 8 callers make two batches."""


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


async def run(
    scorer: OnnxScorer,
    n: int,
    levels: list[int],
    wait_us: int,
    threads: int = 2,
    concurrent_batches: int = 2,
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(1000, len(MODEL_FEATURES))).astype(np.float32) for _ in range(64)]
    work = [blocks[i % len(blocks)] for i in range(n)]
    batcher: MicroBatcher[tuple[OnnxScorer, np.ndarray], np.ndarray] = MicroBatcher(
        score_batch, 32, wait_us, 4096
    )
    batcher.start()
    # a batch per core in flight (Ray Serve's max_concurrent_batches), each of at
    # most OVERLAPPED_MAX_BATCH requests
    overlapped: MicroBatcher[tuple[OnnxScorer, np.ndarray], np.ndarray] = MicroBatcher(
        score_batch,
        OVERLAPPED_MAX_BATCH,
        wait_us,
        4096,
        max_concurrent_batches=concurrent_batches,
    )
    overlapped.start()

    async def off(x: np.ndarray) -> np.ndarray:
        # The ranker scores on its event loop: a request waits for the loop, then
        # scores. Yielding first lets concurrent callers queue as they would there
        # (without it one caller would run every block back to back).
        await asyncio.sleep(0)
        return scorer.score(x)

    async def on(x: np.ndarray) -> np.ndarray:
        return await batcher.submit((scorer, x))

    async def on_overlapped(x: np.ndarray) -> np.ndarray:
        return await overlapped.submit((scorer, x))

    pool = ThreadPoolExecutor(threads, thread_name_prefix="score")
    loop = asyncio.get_running_loop()

    async def pooled(x: np.ndarray) -> np.ndarray:
        # each call on a worker thread (ONNX Runtime releases the GIL, so calls
        # overlap on the cores and the loop goes on); the ranker does not do this
        return await loop.run_in_executor(pool, scorer.score, x)

    out: dict[str, Any] = {}
    for level in levels:
        row: dict[str, Any] = {}
        modes = (("off", off, None), ("on", on, batcher), ("on_overlapped", on_overlapped,
                 overlapped), ("threads", pooled, None))  # fmt: skip
        for name, fn, b in modes:
            await drive(fn, work[:100], level)  # warm-up
            if b is not None:
                b.batch_sizes.clear()
            row[name] = await drive(fn, work, level)
            if b is not None:
                row[name]["mean_batch"] = float(np.mean(b.batch_sizes))
        row["rps_ratio_on_off"] = row["on"]["rps"] / row["off"]["rps"]
        out[f"concurrency_{level}"] = row
        off_, on_ = row["off"], row["on"]
        print(
            f"concurrency {level:>3}: "
            f"off {off_['rps']:6.0f} req/s p50 {off_['p50']:6.3f} p99 {off_['p99']:6.3f} ms | "
            f"on {on_['rps']:6.0f} req/s p50 {on_['p50']:6.3f} p99 {on_['p99']:6.3f} ms, "
            f"mean batch {on_['mean_batch']:.1f} | on/off {row['rps_ratio_on_off']:.2f}x | "
            f"on, {concurrent_batches} of <= {OVERLAPPED_MAX_BATCH} at once "
            f"{row['on_overlapped']['rps']:6.0f} req/s p50 "
            f"{row['on_overlapped']['p50']:6.3f} p99 {row['on_overlapped']['p99']:6.3f} ms | "
            f"{threads} threads {row['threads']['rps']:6.0f} req/s p50 "
            f"{row['threads']['p50']:6.3f} p99 {row['threads']['p99']:6.3f} ms"
        )
    await batcher.stop()
    await overlapped.stop()
    pool.shutdown()
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
        med = percentiles(t)["p50"]
        out[str(1000 * m)] = {"median_ms": med, "ms_per_1000_rows": med / m}
        print(f"one call, {1000 * m:>6} rows: {med:7.3f} ms ({med / m:.3f} ms per 1000 rows)")
    return out


VARIANTS = {"teacher": "teacher", "student_fp32": "model", "student_int8": "model_int8"}


def model_costs(scorers: dict[str, OnnxScorer], repeats: int = 300) -> dict[str, Any]:
    """One 1000-row call per model, interleaved round by round so that noise on a
    shared machine hits every model alike; ms percentiles and ratios."""
    x = np.random.default_rng(2).normal(size=(1000, len(MODEL_FEATURES))).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(20):
        for s in scorers.values():
            s.score(x)
    for _ in range(repeats):
        for name, s in scorers.items():
            t0 = time.perf_counter()
            s.score(x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {name: percentiles(t) for name, t in times.items()}
    base = out["teacher"]["p50"]
    for name in scorers:
        out[name]["teacher_over_this_p50"] = base / out[name]["p50"]
        print(
            f"1000 rows, {name:<13} p50 {out[name]['p50']:6.3f} ms  p99 {out[name]['p99']:6.3f} ms"
            f"  teacher / this: {out[name]['teacher_over_this_p50']:5.1f}x"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-wait-us", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument(
        "--concurrent-batches", type=int, default=2, help="batches in flight, overlapped variant"
    )
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                    help="as ranker.device: CUDA when a test session answers")  # fmt: skip
    args = ap.parse_args()
    aset = artifacts.load(Path(args.artifacts))
    m = aset.manifest.model
    on_gpu = decide("--device", args.device, onnx_cuda, "")
    scorers = {}
    for name, role in VARIANTS.items():
        scorers[name] = OnnxScorer(
            str(aset.verified(role)), m.input_name, m.output_name, list(m.features), args.threads,
            providers(on_gpu),
        )  # fmt: skip
        scorers[name].load()
    costs = model_costs(scorers)
    levels = [int(x) for x in args.concurrency.split(",")]
    by_variant: dict[str, Any] = {}
    for name in ("student_fp32", "student_int8"):
        print(f"-- {name}")
        sizes = call_sizes(scorers[name], [1, 4, 8, 32])
        rows = asyncio.run(
            run(scorers[name], args.requests, levels, args.max_wait_us,
                concurrent_batches=args.concurrent_batches)
        )  # fmt: skip
        by_variant[name] = {"call_sizes": sizes, "rows": rows}
    result = {
        "artifact_version": aset.version,
        "model": m.kind,
        "providers": providers(on_gpu),
        "intra_op_threads": args.threads,
        "max_wait_us": args.max_wait_us,
        "on_overlapped": {
            "max_concurrent_batches": args.concurrent_batches,
            "max_batch": OVERLAPPED_MAX_BATCH,
        },
        "machine": machine(),
        "model_costs_1000_rows": costs,
        "batching": by_variant,
        "rows": by_variant["student_fp32"]["rows"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "score_batching.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_on_off(
        result["rows"],
        RESULTS / "score_batching.png",
        "1000-row requests scored / s",
        f"Scoring the student (FP32), {result['providers'][0]}, {args.threads} intra-op thread",
        {
            "off": "batching off",
            "on": "batching on",
            "on_overlapped": (
                f"on, {args.concurrent_batches} batches of <= {OVERLAPPED_MAX_BATCH} at once"
            ),
            "threads": "off, 2 worker threads",
        },
    )
    print(f"wrote {RESULTS / 'score_batching.json'} and .png")


if __name__ == "__main__":
    main()
