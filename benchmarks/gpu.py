"""The GPU path in one command: exact and IVF search on the GPU, scoring on CUDA
with cross-request batching, and the latency budget at GPU rates.

    python -m benchmarks.gpu                                  # on a GPU host, 1M items
    python -m benchmarks.gpu --vectors 1000000 --skip-latency # a GPU host, no set: minutes
    python -m benchmarks.gpu --artifacts DIR --quick --out DIR  # any host, CI-sized

Run with the gpu extra installed (``make venv-gpu``; ``.venv-gpu/bin/python -m
benchmarks.gpu``). It probes both devices first (``candidate.device.faiss_gpu``,
``ranker.device.onnx_cuda``: a GPU counts only when a test on it passes) and
runs unchanged on a CPU host, where every GPU part is written as skipped with
the probe's reason and only the CPU reference rows are measured.

Parts, each in ``gpu.json`` under ``--out`` (default ``benchmarks/results``):

1. ``exact``: the set's learned item vectors in ``IndexFlatIP`` on the CPU (the
   oracle) and ``GpuIndexFlatIP`` (what ``candidate.gpu_index = "flat"`` serves);
   recall@k of the GPU's lists against the CPU's (tie-tolerant: a slot counts when
   its exact score reaches the k-th), latency one query at a time and in batches
   of 8, 32 and 128.
2. ``ivf_clone``: the set's own index cloned to the GPU (``gpu_index = "clone"``)
   at the manifest's search parameters, beside the same index on the CPU.
3. ``scoring``: the served student on CUDA, 1000-row requests from 1, 8 and 32
   concurrent callers, batching off and on (``benchmarks.score_batching``).
4. ``latency``: ``benchmarks.latency_budget`` at ``--rates`` (200, 500, 1000
   Rank/s) with the ladder on, its set of ``--items`` built once in ``--work``
   (Redis online store; needs redis-server and the offline extra for the build).

``--vectors N`` measures the search parts on N generated unit vectors of the
learned space's dimension (64 topic centres, items and queries near them; the IVF
index built here with the learned space's default) instead of a set, and skips
scoring and the latency part: the exact-search figures at 1M in the minutes a
lent GPU machine gives, without the 40-minute 1M build.

Targets, one summary line each: exact recall 1.0; Rank p99 <= 15 ms at >= 1000
Rank/s at 1M items.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.ann import recall, set_data, time_queries
from benchmarks.harness import RESULTS, ROOT, machine, percentiles, pyplot
from candidate.device import faiss_gpu
from candidate.index import (
    build_index,
    parse_search_params,
    resolve_auto,
    search_parameters,
    set_gpu_params,
    to_gpu,
)
from ranker.device import onnx_cuda, providers
from sieve import artifacts
from sieve.device import Probe

BATCHES = (8, 32, 128)
LATENCY_TARGET_MS = 15.0
LATENCY_TARGET_RATE = 1000.0


def nvidia_smi() -> str | None:
    """The GPUs as ``nvidia-smi`` names them (name, driver, memory), if it is there."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return out.stdout.strip() or out.stderr.strip()


def skipped(probe: Probe) -> dict[str, Any]:
    return {"skipped": f"no usable GPU: {probe.detail}"}


def timings(index: faiss.Index, q: np.ndarray, k: int, params: Any = None) -> dict[str, Any]:
    """One query at a time (p50/p95/p99 ms), then batches of ``BATCHES`` queries
    (ms per batch and queries per second)."""
    alone, _ = time_queries(index, q, k, params, warmup=min(20, len(q)))
    out: dict[str, Any] = {"alone_ms": percentiles(alone), "batched": {}}
    for b in BATCHES:
        if b > len(q):
            continue
        index.search(q[:b], k, params=params)  # warm-up
        lat = []
        for lo in range(0, len(q) - b + 1, b):
            t0 = time.perf_counter()
            index.search(q[lo : lo + b], k, params=params)
            lat.append((time.perf_counter() - t0) * 1e3)
        p = percentiles(lat)
        out["batched"][str(b)] = {"batch_ms": p, "queries_per_s": b / (p["p50"] / 1e3)}
    return out


def mean_recall(emb: np.ndarray, q: np.ndarray, ids: np.ndarray, kth: np.ndarray) -> float:
    return float(np.mean([recall(emb, q[i], ids[i], float(kth[i])) for i in range(len(q))]))


def generated(n: int, n_queries: int, dim: int = 64, topics: int = 64) -> tuple[np.ndarray, ...]:
    """(n item vectors, n_queries query vectors), unit length, each near one of
    ``topics`` seeded centres: a stand-in for a set's learned space."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((topics, dim)).astype(np.float32)

    def near(m: int) -> np.ndarray:
        x = centres[rng.integers(0, topics, m)] + 0.8 * rng.standard_normal((m, dim))
        x = x.astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return near(n), near(n_queries)


def ann_parts(
    root: Path | None, n_queries: int, k: int, gpu: Probe, vectors: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(exact, ivf_clone) on the set's learned space, or on ``vectors`` generated
    vectors when there is no set."""
    if root is not None:
        emb, q, _, _ = set_data(root, n_queries, seed=0)
    else:
        emb, q = generated(vectors, n_queries)
    k = min(k, len(emb))
    cpu = faiss.IndexFlatIP(emb.shape[1])
    cpu.add(emb)
    truth, _ = cpu.search(q, k)
    kth = truth[:, -1]
    exact: dict[str, Any] = {"items": len(emb), "dim": emb.shape[1], "k": k, "queries": len(q),
                             "cpu": timings(cpu, q, k)}  # fmt: skip
    if root is not None:
        m = artifacts.load(root).manifest.index
        factory, spec = m.factory, m.search_params
        cpu_ivf = faiss.read_index(str(artifacts.load(root).verified("index")))
    else:
        factory, spec = resolve_auto(len(emb), "auto", "auto", emb.shape[1], k)
        cpu_ivf = build_index(emb, factory)
    params = parse_search_params(spec)
    sp = search_parameters(cpu_ivf, params, k, None)
    _, cpu_ids = cpu_ivf.search(q, k, params=sp)
    clone: dict[str, Any] = {
        "factory": factory,
        "search_params": spec,
        "cpu": {"recall": mean_recall(emb, q, cpu_ids, kth), **timings(cpu_ivf, q, k, sp)},
    }
    if not gpu.usable:
        exact["gpu"] = clone["gpu"] = skipped(gpu)
        return exact, clone
    flat = to_gpu(cpu, emb)
    _, ids = flat.index.search(q, k)
    exact["gpu"] = {"recall": mean_recall(emb, q, ids, kth), **timings(flat.index, q, k)}
    try:
        ivf = to_gpu(cpu_ivf, None)
    except Exception as e:  # noqa: BLE001 - an index type Faiss cannot clone is a result
        clone["gpu"] = {"skipped": f"Faiss cannot clone {factory} to the GPU: {e}"}
        return exact, clone
    set_gpu_params(ivf.index, params)
    _, ids = ivf.index.search(q, k)
    clone["gpu"] = {"recall": mean_recall(emb, q, ids, kth), **timings(ivf.index, q, k)}
    return exact, clone


def scoring_part(root: Path, cuda: Probe, requests: int) -> dict[str, Any]:
    """The served student on CUDA from 1, 8 and 32 callers, batching off and on."""
    if not cuda.usable:
        return skipped(cuda)
    from benchmarks.score_batching import run
    from ranker.scorer import OnnxScorer

    aset = artifacts.load(root)
    m = aset.manifest.model
    scorer = OnnxScorer(str(aset.verified("model")), m.input_name, m.output_name,
                        list(m.features), 1, providers(True))  # fmt: skip
    scorer.load()
    return {"providers": providers(True),
            "rows": asyncio.run(run(scorer, requests, [1, 8, 32], wait_us=200))}  # fmt: skip


def latency_part(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``benchmarks.latency_budget`` at GPU rates, the ladder on; its own JSON and
    plots in ``out/latency_gpu``."""
    if shutil.which("redis-server") is None:
        return {"skipped": "redis-server is not installed (make redis)"}
    results = out / "latency_gpu"
    cmd = [
        sys.executable, "-m", "benchmarks.latency_budget", "--items", str(args.items),
        "--work", str(args.work), "--rates", args.rates, "--full-sweep",
        "--step-s", str(args.step_s), "--sustain-rate", args.rates.split(",")[-1],
        "--sustain-s", str(args.step_s), "--naive-rate", "0", "--results", str(results),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)
    r = json.loads((results / "latency_budget.json").read_text())
    return {
        "items": r["items"],
        "steps": [
            {
                "offered_rps": s["offered_rps"],
                "ok": s["ok"],
                "errors": s["errors"],
                "latency_ms": s["latency_ms"],
                "answers_on_a_rung": s["answers_on_a_rung"],
            }
            for s in r["sweep"]
        ],  # fmt: skip
        "json": str(results / "latency_budget.json"),
    }


def summary(result: dict[str, Any]) -> list[str]:
    """One line per target: met, not met (with the figure) or skipped (why)."""
    lines = []
    gpu = result["exact"]["gpu"]
    if "skipped" in gpu:
        lines.append(f"exact GPU recall 1.0: SKIPPED ({gpu['skipped']})")
    else:
        ok = gpu["recall"] >= 1.0 - 1e-9
        lines.append(f"exact GPU recall 1.0: {'MET' if ok else 'NOT MET'} "
                     f"(recall@{result['exact']['k']} {gpu['recall']:.4f})")  # fmt: skip
    lat = result["latency"]
    target = f"Rank p99 <= {LATENCY_TARGET_MS:g} ms at >= {LATENCY_TARGET_RATE:g}/s at 1M items"
    if "skipped" in lat:
        lines.append(f"{target}: SKIPPED ({lat['skipped']})")
    else:
        top = [s for s in lat["steps"] if s["offered_rps"] >= LATENCY_TARGET_RATE]
        p99 = min((s["latency_ms"].get("p99", 1e9) for s in top if not s["errors"]), default=None)
        met = p99 is not None and p99 <= LATENCY_TARGET_MS and lat["items"] >= 1_000_000
        lines.append(f"{target}: {'MET' if met else 'NOT MET'} ({lat['items']} items, "
                     f"p99 {p99 if p99 is None else round(p99, 2)} ms)")  # fmt: skip
    for part in ("ivf_clone", "scoring"):
        if "skipped" in result[part].get("gpu", result[part]):
            lines.append(f"{part}: SKIPPED")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for name, part in (("exact", result["exact"]), ("IVF", result["ivf_clone"])):
        for where in ("cpu", "gpu"):
            r = part[where]
            if "skipped" in r:
                continue
            sizes = [1, *(int(b) for b in r["batched"])]
            qps = [1e3 / r["alone_ms"]["p50"], *(b["queries_per_s"] for b in r["batched"].values())]
            ax.plot(sizes, qps, "o-", label=f"{name} on {where.upper()}")
    ax.set(xscale="log", yscale="log", xlabel="queries per search", ylabel="queries / s (p50)",
           title=f"top-{result['exact']['k']} of {result['exact']['items']:,} items")  # fmt: skip
    ax.legend()
    ax = axes[1]
    rows = result["scoring"].get("rows")
    if rows:
        levels = [int(k.split("_")[1]) for k in rows]
        for mode in ("off", "on"):
            ax.plot(levels, [rows[f"concurrency_{lv}"][mode]["p99"] for lv in levels], "o-",
                    label=f"batching {mode} p99")  # fmt: skip
        ax.set(xscale="log", xlabel="concurrent callers", ylabel="ms per 1000-row request")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "scoring on CUDA: skipped", ha="center", va="center")
    ax.set_title("student on CUDA")
    ax = axes[2]
    steps = result["latency"].get("steps")
    if steps:
        rates = [s["offered_rps"] for s in steps]
        for p in ("p50", "p99"):
            ax.plot(rates, [s["latency_ms"].get(p, np.nan) for s in steps], "o-", label=p)
        ax.axhline(LATENCY_TARGET_MS, color="grey", ls="--", label="target p99")
        ax.set(xlabel="Rank / s offered", ylabel="ms")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "latency budget: skipped", ha="center", va="center")
    ax.set_title("Rank end to end")
    fig.suptitle(f"GPU path: {result['gpu'] or 'no GPU'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", help="a set to measure (default: WORK/artifacts, built by "
                                        "the latency part)")  # fmt: skip
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--work", help="kept between runs (default .bench/gpu_ITEMS)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=2000, help="scoring: requests per level")
    ap.add_argument("--rates", default="200,500,1000")
    ap.add_argument("--step-s", type=float, default=20.0)
    ap.add_argument("--vectors", type=int, default=0,
                    help="search parts on this many generated vectors, no set")  # fmt: skip
    ap.add_argument("--skip-latency", action="store_true", help="no latency part")
    ap.add_argument("--quick", action="store_true", help="CI's size: 64 queries, 200 requests")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    args.work = Path(args.work or ROOT / ".bench" / f"gpu_{args.items}").resolve()
    if args.quick:
        args.queries, args.requests = 64, 200
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gpu, cuda = faiss_gpu(0), onnx_cuda()
    print(f"Faiss GPU: {'yes' if gpu.usable else 'no'} ({gpu.detail})")
    print(f"ONNX Runtime CUDA: {'yes' if cuda.usable else 'no'} ({cuda.detail})")
    if not (gpu.usable and cuda.usable):
        latency = skipped(cuda if gpu.usable else gpu)
    elif args.skip_latency or args.vectors or args.artifacts:
        latency = {"skipped": "asked not to (--skip-latency, --vectors or --artifacts: the "
                              "latency part builds and serves its own set in --work)"}  # fmt: skip
    else:
        latency = latency_part(args, out)
    root: Path | None = None
    if not args.vectors:
        root = Path(args.artifacts) if args.artifacts else args.work / "artifacts"
        if not (root / artifacts.CURRENT).exists():
            raise SystemExit(f"no artifact set in {root}: pass --artifacts or --vectors N, or "
                             "run on a GPU host, where the latency part builds one")  # fmt: skip
    exact, clone = ann_parts(root, args.queries, args.k, gpu, args.vectors)
    no_set = {"skipped": "--vectors: no set, no model to score"}
    result: dict[str, Any] = {
        "machine": machine(),
        "gpu": nvidia_smi(),
        "probes": {"faiss": vars(gpu), "onnxruntime": vars(cuda)},
        "versions": {"faiss": faiss.__version__},
        "artifact_version": artifacts.load(root).version if root else None,
        "exact": exact,
        "ivf_clone": clone,
        "scoring": scoring_part(root, cuda, args.requests) if root else no_set,
        "latency": latency,
    }
    result["summary"] = summary(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "gpu.png")
    for where in ("cpu", "gpu"):
        r = exact[where]
        if "skipped" not in r:
            print(f"exact top-{exact['k']} on {where.upper()}: p50 {r['alone_ms']['p50']:.2f} "
                  f"p99 {r['alone_ms']['p99']:.2f} ms a query"
                  + (f", recall {r['recall']:.4f}" if "recall" in r else ""))  # fmt: skip
    for line in result["summary"]:
        print(line)
    print(f"wrote {out / 'gpu.json'} and gpu.png in {result['seconds']} s")


if __name__ == "__main__":
    main()
