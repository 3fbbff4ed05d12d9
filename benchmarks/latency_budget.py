"""Latency budget benchmark: Rank under open-loop load, stage by stage, against
the 50 ms budget of ../shared/DESIGN.md.

    python -m benchmarks.latency_budget                    # 1M items (builds once)
    python -m benchmarks.latency_budget --items 20000 --rates 10,20 --step-s 3 \\
        --sustain-s 3                                      # the CI-sized run

Production settings, every part its own process on loopback:

1. ``redis-server`` with its data in ``WORK/redis`` (kept between runs: the first
   run builds a synthetic artifact set of ``--items`` items with the Redis online
   store, ``sieve build --synthetic``, and saves the materialized store; later runs
   load it);
2. ``sieve serve --only candidate`` and ``sieve serve --only ranker`` (Redis
   features, Redis shown-history, the default rule chain);
3. the load generator (``benchmarks.loadgen``): Poisson arrivals, latency from
   the intended send time, HDR histograms, one process per step.

A sweep over ``--rates`` (each at least ``--step-s`` recorded seconds after
``--warmup`` and long enough for ``--min-samples`` answers; it stops after two
failing rates) finds the highest rate with p99 <= 50 ms and no errors, and the
knee (the first rate whose p99 is over twice the lowest rate's); then
``--sustain-rate`` is held for ``--sustain-s``. Writes
``RESULTS/latency_budget.json`` (every figure and the machine) and
``latency_{cdf,stages,sweep}.png``.

    python -m benchmarks.latency_budget --summarize RESULTS/latency_budget.json

prints the sweep's summary again (JSON) from the ``sweep`` of a saved result,
measuring nothing: what the rules above make of steps already run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    BUDGET_MS,
    FULL_QUALITY_RUNG_SHARE,
    HEADROOM_MS,
    RESULTS,
    ROOT,
    TOTAL_BUDGET_MS,
    bench_config,
    build_once,
    item_count,
    loadgen,
    machine,
    process,
    pyplot,
    redis_port_of,
    reliability,
    rung_share,
    serving,
    users_sample,
    wait_ready,
)
from sieve import artifacts
from sieve.local_redis import local_redis


def _passes(step: dict[str, Any]) -> bool:
    return not step["errors"] and step["latency_ms"].get("p99", 1e9) <= TOTAL_BUDGET_MS


def sweep_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest offered rate that passes (p99 <= 50 ms, no errors); the highest
    that passes at full quality (also at most ``FULL_QUALITY_RUNG_SHARE`` of its
    answers on a rung: the ladder keeps p99 in budget past that by giving up
    quality); and the knee: the first rate whose p99 is over twice the lowest
    rate's."""
    ok = [s["offered_rps"] for s in steps if _passes(s)]
    full = [s["offered_rps"] for s in steps
            if _passes(s) and rung_share(s) <= FULL_QUALITY_RUNG_SHARE]  # fmt: skip
    base = steps[0]["latency_ms"].get("p99", 0.0) if steps else 0.0
    knee = next((s["offered_rps"] for s in steps if s["latency_ms"].get("p99", 1e9) > 2 * base),
                None)  # fmt: skip
    return {
        "max_rate_within_budget": max(ok) if ok else None,
        "max_rate_full_quality": max(full) if full else None,
        "full_quality_rung_share": FULL_QUALITY_RUNG_SHARE,
        "knee_rate": knee,
    }


def _naive(root: Path, args: argparse.Namespace, users: Path, work: Path) -> dict[str, Any]:
    """Serve the naive pipeline (its own process) and drive it like sieve."""
    ready, log = work / "naive.ready", work / "logs" / "naive.log"
    ready.unlink(missing_ok=True)
    with process(
        [sys.executable, "-m", "benchmarks.naive", "--artifacts", str(root),
         "--ready-file", str(ready)],
        log,
    ) as proc:  # fmt: skip
        port = wait_ready(proc, ready, log, args.start_timeout)
        return loadgen(f"127.0.0.1:{port}", args.naive_rate, args.naive_s, args.warmup, users,
                        work / "naive.json", seed=7)  # fmt: skip


def naive_ratios(sieve: dict[str, Any], naive: dict[str, Any]) -> dict[str, Any]:
    """naive / sieve at p50 and p99, end to end and per budget line."""

    def ratio(a: dict[str, Any], b: dict[str, Any], p: str) -> float | None:
        return a[p] / b[p] if p in a and p in b and b[p] > 0 else None

    out: dict[str, Any] = {
        "end_to_end": {
            p: ratio(naive["latency_ms"], sieve["latency_ms"], p) for p in ("p50", "p99")
        }
    }
    for line in BUDGET_MS:
        a, b = naive["budget_ms"].get(line, {}), sieve["budget_ms"].get(line, {})
        out[line] = {p: ratio(a, b, p) for p in ("p50", "p99")}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work).resolve()
    redis_port = redis_port_of(work)
    config = bench_config(work, redis_port, reliability(args.max_in_flight, args.cpu_threads))
    root = work / "artifacts"
    seconds: dict[str, float] = {}
    with local_redis(port=redis_port, data_dir=work / "redis") as redis_address:
        built = build_once(root, args.items, config, redis_address)
        if built is not None:
            seconds["build"] = built
        aset = artifacts.load(root)
        users_file = users_sample(aset, work)

        t0 = time.perf_counter()
        with (
            serving("candidate", config, root, work, "candidate.log", args.start_timeout,
                    "--candidate-port", "0") as (cproc, cport),
            serving("ranker", config, root, work, "ranker.log", args.start_timeout,
                    "--ranker-port", "0", "--candidate-address",
                    f"127.0.0.1:{cport}") as (rproc, rport),
        ):  # fmt: skip
            seconds["services_ready"] = round(time.perf_counter() - t0, 1)
            address = f"127.0.0.1:{rport}"
            steps = []
            for i, rate in enumerate(float(r) for r in args.rates.split(",")):
                # long enough for min_samples answers: a p99 needs a few hundred
                step_s = max(args.step_s, args.min_samples / rate)
                step = loadgen(address, rate, step_s, args.warmup, users_file,
                                work / f"step_{rate:g}.json", seed=i)  # fmt: skip
                steps.append(step)
                failing = [not _passes(s) for s in steps[-2:]]
                if len(failing) == 2 and all(failing) and not args.full_sweep:
                    break  # two rates past the budget: higher ones only queue
            naive = paired = None
            if args.naive_rate > 0:
                # the same arrivals and users (same seed) through both pipelines,
                # before the held rate can leave sieve's processes behind
                paired = loadgen(address, args.naive_rate, args.naive_s, args.warmup,
                                  users_file, work / "paired_sieve.json", seed=7)  # fmt: skip
                naive = _naive(root, args, users_file, work)
            sustained = loadgen(address, args.sustain_rate, args.sustain_s, args.warmup,
                                 users_file, work / "sustained.json", seed=99)  # fmt: skip
            for proc in (rproc, cproc):
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args!r} exited during the run")
    for s in steps:
        s.pop("hdr", None)
    for r in (*steps, sustained, paired, naive):
        if r is not None:
            r.pop("ok_hdr", None)  # the answered calls' histogram: for pooling (benchmarks.ab)
    return {
        "machine": machine(),
        "items": item_count(aset),
        "artifact_version": aset.version,
        "index": aset.manifest.index.factory,
        "settings": {
            "online_store": "redis",
            "shown_history": "redis",
            "max_in_flight": args.max_in_flight or "default",
            "cpu_threads": "default" if args.cpu_threads is None else args.cpu_threads,
            "processes": "redis-server, candidate, ranker, load generator (one per step)",
            "warmup_s": args.warmup,
            "step_s": args.step_s,
        },
        "seconds": seconds,
        "budget_ms": {
            **{k: v[0] for k, v in BUDGET_MS.items()},
            "headroom": HEADROOM_MS,
            "total": TOTAL_BUDGET_MS,
        },  # fmt: skip
        "sweep": steps,
        "sweep_summary": sweep_summary(steps),
        "sustained": sustained,
        "sustained_within_budget": _passes(sustained),
        "naive": None
        if naive is None or paired is None
        else {
            "what": "Feast get_online_features, exact IndexFlatIP, the teacher, no batching "
            "(benchmarks/naive.py), same arrivals and users as 'sieve'",
            "sieve": paired,
            "naive": naive,
            "ratios": naive_ratios(paired, naive),
        },
    }


def plot(result: dict[str, Any], out_dir: Path) -> None:
    plt = pyplot()
    sus = result["sustained"]

    # latency CDF of every run, HDR style: the tail spread out
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ticks = [50, 90, 99, 99.9, 99.99]
    for i, (label, run_) in enumerate(
        [*((f"{x['offered_rps']:g}/s", x) for x in result["sweep"]),
         (f"{sus['offered_rps']:g}/s held {sus['duration_s']:g} s", sus)]
    ):  # fmt: skip
        pts = [(p, ms) for p, ms in run_["cdf_ms"] if p < 100]
        x = [1.0 / (1.0 - p / 100.0) for p, _ in pts]
        ax.plot(x, [ms for _, ms in pts], "o-", ms=2, color=f"C{i % 10}", label=label)
    ax.axhline(TOTAL_BUDGET_MS, color="red", ls="--", label="budget p99 50 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([1 / (1 - t / 100) for t in ticks], [f"p{t:g}" for t in ticks])
    ax.set_ylabel("Rank latency, ms (from intended send time)")
    ax.set_title(f"Latency by percentile, {result['items']:,} items, offered Rank/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=110)

    # each budget line: measured p50 and p99 beside its budget, at the held rate
    # (the target's; the sweep's highest rates pass by taking rungs)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    lines = list(BUDGET_MS)
    y = np.arange(len(lines))
    got = sus["budget_ms"]
    ax.barh(y + 0.27, [BUDGET_MS[n][0] for n in lines], 0.27, color="lightgrey", label="budget p99")
    ax.barh(y, [got.get(n, {}).get("p99", 0) for n in lines], 0.27, color="C1", label="p99")
    ax.barh(y - 0.27, [got.get(n, {}).get("p50", 0) for n in lines], 0.27, color="C0", label="p50")
    ax.set_yticks(y, lines)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    e2e = sus["latency_ms"]
    ax.set_title(
        f"Stages vs budget at {sus['offered_rps']:g} Rank/s held {sus['duration_s']:g} s\n"
        f"end to end p50 "
        f"{e2e.get('p50', 0):.1f} / p99 {e2e.get('p99', 0):.1f} ms of 50"
    )
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_stages.png", dpi=110)

    # offered rate against p99 and throughput
    steps = result["sweep"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rates = [s["offered_rps"] for s in steps]
    ax.plot(rates, [s["latency_ms"].get("p99", np.nan) for s in steps], "o-", label="p99")
    for s in steps:  # the share of answers that took a rung: what the ladder gave up
        at = (s["offered_rps"], s["latency_ms"].get("p99", 1))
        ax.annotate(f"{100 * rung_share(s):.0f}%", at, textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7)  # fmt: skip
    ax.plot(rates, [s["latency_ms"].get("p50", np.nan) for s in steps], "o--", label="p50")
    ax.axhline(TOTAL_BUDGET_MS, color="red", ls="--", label="budget 50 ms")
    ax.set_xlabel("offered Rank/s (Poisson)")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(rates, [s["achieved_rps"] for s in steps], "s:", color="C2", label="achieved/s")
    ax2.set_ylabel("answered per second")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax.grid(alpha=0.3)
    summary = result["sweep_summary"]
    ax.set_title(
        f"Sweep: max within budget {summary['max_rate_within_budget']}/s "
        f"({summary['max_rate_full_quality']}/s at full quality), "
        f"knee {summary['knee_rate']}/s; labels: answers on a rung"
    )
    fig.tight_layout()
    fig.savefig(out_dir / "latency_sweep.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--work", help="kept between runs (default .bench/latency_ITEMS)")
    ap.add_argument("--rates", default="25,50,100,150,200,250,300,400")
    ap.add_argument("--step-s", type=float, default=20.0)
    ap.add_argument(
        "--min-samples", type=int, default=300, help="steps last until about this many answers"
    )
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--full-sweep", action="store_true", help="do not stop at the first failure")
    ap.add_argument("--sustain-rate", type=float, default=100.0)
    ap.add_argument("--sustain-s", type=float, default=60.0)
    ap.add_argument("--naive-rate", type=float, default=4.0, help="0 skips the naive pipeline")
    ap.add_argument("--naive-s", type=float, default=30.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--max-in-flight", type=int, help="ranker.reliability.max_in_flight")
    ap.add_argument("--cpu-threads", type=int, help="ranker.reliability.cpu_threads")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument(
        "--summarize", metavar="JSON", help="print the summary of a saved result's sweep; no run"
    )
    args = ap.parse_args()
    if args.summarize:
        steps = json.loads(Path(args.summarize).read_text())["sweep"]
        print(json.dumps(sweep_summary(steps)))
        return
    args.work = args.work or str(ROOT / ".bench" / f"latency_{args.items}")
    result = run(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency_budget.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out)
    for s in result["sweep"]:
        lat = s["latency_ms"]
        print(
            f"{s['offered_rps']:>6g}/s  ok {s['ok']:>6}  errors {s['errors']}  p50 "
            f"{lat.get('p50', 0):7.2f}  p99 {lat.get('p99', 0):7.2f}  "
            f"max {lat.get('max', 0):8.2f} ms  rungs {100 * rung_share(s):.1f}%"
            + (
                f"  shed {shed['n']} (p99 {shed['p99']:.2f} ms)"
                if (shed := s.get("shed_latency_ms"))
                else ""
            )
        )
    sus = result["sustained"]
    print(f"sweep: {result['sweep_summary']}")
    print(
        f"sustained {sus['offered_rps']:g}/s for {sus['duration_s']:g} s: ok {sus['ok']}, "
        f"errors {sus['errors']}, p99 {sus['latency_ms'].get('p99', 0):.2f} ms, "
        f"rungs {100 * rung_share(sus):.1f}%, within budget: {result['sustained_within_budget']}"
    )
    for line, v in sus["budget_ms"].items():
        print(
            f"  {line:<36} p50 {v['p50']:6.2f}  p99 {v['p99']:6.2f}  (budget {v['budget_p99']:g})"
        )
    if result["naive"]:
        r, n, p = result["naive"]["ratios"], result["naive"]["naive"], result["naive"]["sieve"]
        print(
            f"naive pipeline at {n['offered_rps']:g}/s: p50 {n['latency_ms'].get('p50', 0):.1f} "
            f"p99 {n['latency_ms'].get('p99', 0):.1f} ms, errors {n['errors']}; sieve p50 "
            f"{p['latency_ms'].get('p50', 0):.1f} p99 {p['latency_ms'].get('p99', 0):.1f} ms"
        )
        for line, v in r.items():
            cells = "  ".join(f"{q} {x:.1f}x" for q, x in v.items() if x is not None)
            print(f"  naive / sieve {line:<36} {cells}")
    print(f"wrote {out / 'latency_budget.json'} and latency_*.png")


if __name__ == "__main__":
    main()
