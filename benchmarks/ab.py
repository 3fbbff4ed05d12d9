"""Interleaved A/B: Rank latency of two checkouts of this repo, side by side, on one set.

    python -m benchmarks.ab --work /work/bench1m --a /work/old:sieve.cli \\
        --b /work/main:app.cli --rate 100 --seconds 30 --rounds 3
    python -m benchmarks.ab --work .bench/latency_20000 --a ../old:sieve.cli \\
        --b .:app.cli --rate 10 --seconds 5 --rounds 2      # a small check

Each side is ``DIR:MODULE``: a checkout and its CLI module (``sieve.cli`` before
the CLI moved to ``app/``, ``app.cli`` after). Both run on this interpreter with
their checkout as the working directory, so ``python -m MODULE`` imports that
checkout's packages (checked, and recorded as ``imports_from``).

``WORK`` is a ``benchmarks.latency_budget`` work folder: its ``redis-server`` is
started again from ``WORK/redis`` (same port, the saved materialized store), and
both sides serve ``WORK/artifacts`` with ``WORK/sieve.toml`` (Redis online store,
Redis shown-history), the flags the latency benchmark uses and the same users
file. With ``--work-b``, side B serves that folder's set instead (its own Redis
too): for two checkouts whose sets differ in format, each built by its own code
from the same synthetic catalog, so the users are the same.

Each round runs side A then B, or B then A (ABBA: the order alternates, so a machine
that slows down over the run does not favour one side): start the candidate and
ranker processes, drive ``Rank`` open-loop (``benchmarks.loadgen``, Poisson at
``--rate``, same seed for both sides) for ``--seconds`` after ``--warmup``, stop
them. The shown-history (Redis db 1) is emptied before every run so each starts from
the same state.

Reports per side the per-round and pooled (HDR histograms added up) p50 / p95 /
p99 of the answered calls, the share of answers that took a rung of the
degradation ladder and the errors; per round the ratios B/A of p50 and p99, and
the pooled ratios beside the round-to-round spread of each side (the noise).
Writes ``RESULTS/ab.json`` (with the machine and both checkouts' commits) and
``ab.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    RESULTS,
    hdr_cdf,
    hdr_merge,
    hdr_summary,
    loadgen,
    machine,
    pyplot,
    redis_port_of,
    rung_share,
    serving,
    users_sample,
)
from sieve import artifacts
from sieve.local_redis import local_redis

HISTORY_DB = 1
"""The Redis database of the shown-history in ``WORK/sieve.toml``."""
PERCENTILES = ("p50", "p95", "p99")


@dataclass(frozen=True)
class Side:
    """One checkout under test."""

    name: str
    """``A`` or ``B``."""
    checkout: Path
    cli_module: str
    ranker_workers: int = 1
    """``sieve serve --ranker-workers``: more than one is driven over an ``ipv4:``
    list with round_robin, and its CPU is the sum of the worker processes'."""
    candidate_shards: int = 1
    """``sieve serve --only candidate --candidate-shards``: more than one serves the
    set's shards (one process each, its CPU the sum) and the ranker scatters to all."""
    loadgen_args: tuple[str, ...] = ()
    """More options of the load generator for this side (TLS, a token file)."""

    @classmethod
    def parse(cls, name: str, spec: str) -> Side:
        """``DIR:MODULE`` -> a side.

        Raises:
            SystemExit: no ``:``, or ``DIR`` is not a folder.
        """
        folder, sep, module = spec.rpartition(":")
        if not sep or not folder or not module:
            raise SystemExit(
                f"--{name.lower()} {spec!r}: expected DIR:MODULE (/work/old:sieve.cli)"
            )
        checkout = Path(folder).resolve()
        if not checkout.is_dir():
            raise SystemExit(f"--{name.lower()}: {checkout} is not a folder")
        return cls(name, checkout, module)


def describe(side: Side) -> dict[str, Any]:
    """The checkout's commit (``dirty``: uncommitted changes to tracked files) and
    where its packages are imported from when run there.

    Raises:
        RuntimeError: the interpreter imports another checkout's packages there.
    """

    def git(*cmd: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(side.checkout), *cmd],
            capture_output=True,
            text=True,
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    probe = "import sieve, ranker; print(sieve.__file__); print(ranker.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=side.checkout, capture_output=True, text=True, check=True
    ).stdout.split()
    if not all(Path(p).resolve().is_relative_to(side.checkout) for p in where):
        raise RuntimeError(f"run in {side.checkout}, {sys.executable} imports {where}")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "checkout": str(side.checkout),
        "cli_module": side.cli_module,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status),
        "imports_from": [str(Path(p).parent) for p in where],
    }


def one_run(
    side: Side,
    rnd: int,
    args: argparse.Namespace,
    work: Path,
    config: Path,
    users: Path,
    redis_address: str,
) -> dict[str, Any]:
    """Serve the set with ``side``'s code, drive it, stop it; the load generator's
    result with the seconds the services took to come up."""
    import redis

    host, port = redis_address.split(":")
    redis.Redis(host=host, port=int(port), db=HISTORY_DB).flushdb()
    root = work / "artifacts"
    tag = f"ab_{side.name}_{rnd}"
    workers = ["--ranker-workers", str(side.ranker_workers)] if side.ranker_workers > 1 else []
    shards = side.candidate_shards
    sharded = ["--candidate-shards", str(shards)] if shards > 1 else []
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        cproc, cport = stack.enter_context(
            serving("candidate", config, root, work, f"{tag}_candidate.log", args.start_timeout,
                    "--candidate-port", "0", *sharded, checkout=side.checkout,
                    cli_module=side.cli_module)
        )  # fmt: skip
        where = ["--candidate-address", f"127.0.0.1:{cport}"]
        if sharded:  # the supervisor's ready file: a "candidate PORT" line per shard
            lines = (work / "candidate.ready").read_text().splitlines()
            where = [a for x in lines for a in ("--candidate-shard", f"127.0.0.1:{x.split()[1]}")]
        rproc, rport = stack.enter_context(
            serving("ranker", config, root, work, f"{tag}_ranker.log", args.start_timeout,
                    "--ranker-port", "0", *where, *workers,
                    checkout=side.checkout, cli_module=side.cli_module)
        )  # fmt: skip
        ready_s = time.perf_counter() - t0
        address = f"127.0.0.1:{rport}"
        if workers:  # the supervisor's ready file: a "ranker PORT ..." line per worker
            lines = (work / "ranker.ready").read_text().splitlines()
            address = "ipv4:" + ",".join(f"127.0.0.1:{x.split()[1]}" for x in lines)
        procs = {"ranker": rproc.pid, "candidate": cproc.pid}
        cpu0 = {name: cpu_seconds_tree(pid) for name, pid in procs.items()}
        run = loadgen(address, args.rate, args.seconds, args.warmup, users,
                      work / f"{tag}.json", seed=args.seed, extra=side.loadgen_args)  # fmt: skip
        run["cpu_ms_per_call"] = {
            name: round((cpu_seconds_tree(pid) - cpu0[name]) * 1e3 / max(1, run["sent"]), 3)
            for name, pid in procs.items()
        }
        for proc in (rproc, cproc):
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited during the run")
    run["services_ready_s"] = round(ready_s, 1)
    return run


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_tree(pid: int) -> float:
    """``cpu_seconds`` of ``pid`` and of its live children (ranker workers under
    their supervisor)."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue  # gone between the listing and the read
    return total


def row(run: dict[str, Any], rnd: int, first: bool) -> dict[str, Any]:
    """What the report keeps of one run."""
    lat = run["ok_latency_ms"]
    return {
        "round": rnd,
        "ran_first": first,
        "sent": run["sent"],
        "ok": run["ok"],
        "errors": run["errors"],
        "rung_share": rung_share(run),
        "rungs": run["rungs"],
        "latency_ms": {p: lat.get(p) for p in (*PERCENTILES, "max", "mean", "n")},
        "all_calls_latency_ms": {p: run["latency_ms"].get(p) for p in PERCENTILES},
        "sender_lag_s": run["sender_lag_s"],
        "services_ready_s": run["services_ready_s"],
        "cpu_ms_per_call": run["cpu_ms_per_call"],
    }


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's runs added up: answered-call percentiles of the merged HDR
    histograms, rung share and errors over all calls."""
    h = hdr_merge([r["ok_hdr"] for r in runs])
    errors: dict[str, int] = {}
    for r in runs:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    ok = sum(r["ok"] for r in runs)
    sent = sum(r["sent"] for r in runs)
    cpu = {
        name: round(sum(r["cpu_ms_per_call"][name] * r["sent"] for r in runs) / max(1, sent), 3)
        for name in runs[0]["cpu_ms_per_call"]
    }
    return {
        "cpu_ms_per_call": cpu,
        "sent": sum(r["sent"] for r in runs),
        "ok": ok,
        "errors": errors,
        "rung_share": sum(r["answers_on_a_rung"] for r in runs) / max(1, ok),
        "latency_ms": hdr_summary(h),
        "cdf_ms": hdr_cdf(h),
    }


def _ratio(b: float | None, a: float | None) -> float | None:
    return b / a if a and b is not None else None


def compare(rows: dict[str, list[dict[str, Any]]], pool: dict[str, Any]) -> dict[str, Any]:
    """B/A per round and pooled, and each side's round-to-round spread (max / min
    of its per-round figure): a pooled ratio further from 1 than both spreads is
    more than this machine's noise."""
    per_round = [
        {
            "round": a["round"],
            **{
                p: _ratio(b["latency_ms"][p], a["latency_ms"][p])
                for p in ("p50", "p99")
            },
        }
        for a, b in zip(rows["A"], rows["B"], strict=True)
    ]  # fmt: skip
    out: dict[str, Any] = {"per_round": per_round, "pooled": {}, "spread": {}, "within_noise": {}}
    for p in ("p50", "p99"):
        r = _ratio(pool["B"]["latency_ms"].get(p), pool["A"]["latency_ms"].get(p))
        spread = {}
        for name in ("A", "B"):
            v = [x["latency_ms"][p] for x in rows[name] if x["latency_ms"][p]]
            spread[name] = max(v) / min(v) if len(v) > 1 else None
        out["pooled"][p] = r
        out["spread"][p] = spread
        noise = max((s for s in spread.values() if s is not None), default=None)
        out["within_noise"][p] = (
            None if r is None or noise is None else bool(max(r, 1 / r) <= noise)
        )
    return out


def _work(folder: str, config: str | None) -> tuple[Path, Path]:
    """(work folder, its config), checked."""
    work = Path(folder).resolve()
    cfg = Path(config).resolve() if config else work / "sieve.toml"
    if (
        not (work / "artifacts" / artifacts.CURRENT).exists()
        or not (work / "redis" / "port").exists()
    ):
        raise SystemExit(f"{work} has no built set: run benchmarks.latency_budget --work {work}")
    if not cfg.is_file():
        raise SystemExit(f"no config {cfg}: run benchmarks.latency_budget --work {work}")
    return work, cfg


def run(args: argparse.Namespace) -> dict[str, Any]:
    work, config = _work(args.work, args.config)
    works = {"A": (work, config), "B": _work(args.work_b, None) if args.work_b else (work, config)}
    if args.b_config:  # side B's own settings over the same work folder
        works["B"] = (works["B"][0], Path(args.b_config).resolve())
    root = work / "artifacts"
    sides = {
        "A": dataclasses.replace(
            Side.parse("A", args.a),
            ranker_workers=args.a_workers,
            candidate_shards=args.a_shards,
            loadgen_args=tuple(shlex.split(args.a_loadgen_args)),
        ),
        "B": dataclasses.replace(
            Side.parse("B", args.b),
            ranker_workers=args.b_workers,
            candidate_shards=args.b_shards,
            loadgen_args=tuple(shlex.split(args.b_loadgen_args)),
        ),
    }
    checkouts = {
        name: {
            **describe(side),
            "ranker_workers": side.ranker_workers,
            "candidate_shards": side.candidate_shards,
        }
        for name, side in sides.items()
    }
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    rows: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    order = []
    with contextlib.ExitStack() as stack:
        address = {
            w: stack.enter_context(local_redis(port=redis_port_of(w), data_dir=w / "redis"))
            for w in {w for w, _ in works.values()}
        }
        aset = artifacts.load(root)
        users = work / "users.txt"
        if not users.is_file():
            users = users_sample(aset, work)
        for rnd in range(args.rounds):
            names = ("A", "B") if rnd % 2 == 0 else ("B", "A")
            order.append("".join(names))
            for name in names:
                w, cfg = works[name]
                r = one_run(sides[name], rnd, args, w, cfg, users, address[w])
                runs[name].append(r)
                rows[name].append(row(r, rnd, first=name == names[0]))
                lat = r["ok_latency_ms"]
                print(
                    f"round {rnd + 1}/{args.rounds} {name}: ok {r['ok']} errors {r['errors']} "
                    f"p50 {lat.get('p50', 0):.2f} p95 {lat.get('p95', 0):.2f} "
                    f"p99 {lat.get('p99', 0):.2f} ms, rungs {100 * rung_share(r):.1f}%",
                    flush=True,
                )
    pool = {name: pooled(runs[name]) for name in runs}
    return {
        "machine": machine(),
        "items": aset.manifest.index.ntotal,
        "artifact_version": aset.version,
        "artifact_version_b": artifacts.load(works["B"][0] / "artifacts").version,
        "index": aset.manifest.index.factory,
        "checkouts": checkouts,
        "settings": {
            "rate_rps": args.rate,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "order": order,
            "seed": args.seed,
            "config": str(config),
            "config_b": str(works["B"][1]),
            "loadgen_args_a": list(sides["A"].loadgen_args),
            "loadgen_args_b": list(sides["B"].loadgen_args),
            "work_b": str(works["B"][0]),
            "users_file": str(users),
            "latency": "answered (OK) Rank calls, from the intended send time (open loop)",
            "shown_history": f"Redis db {HISTORY_DB}, emptied before every run",
            "processes": "redis-server, candidate, ranker (each side's code), load generator",
        },
        "sides": {name: {"rounds": rows[name], "pooled": pool[name]} for name in rows},
        "b_over_a": compare(rows, pool),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-round p50 and p99 of each side, and the pooled latency CDFs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    sides = result["sides"]
    label = {n: f"{n}: {Path(c['checkout']).name} {c['commit'][:8]}{'+' if c['dirty'] else ''}"
             for n, c in result["checkouts"].items()}  # fmt: skip
    ax = axes[0]
    for i, (name, side) in enumerate(sides.items()):
        x = [r["round"] + 1 + (i - 0.5) * 0.15 for r in side["rounds"]]
        for p, marker in (("p50", "o"), ("p99", "s")):
            ax.plot(x, [r["latency_ms"][p] for r in side["rounds"]], marker, color=f"C{i}",
                    label=f"{label[name]} {p}")  # fmt: skip
            ax.axhline(side["pooled"]["latency_ms"][p], color=f"C{i}", lw=0.8,
                       ls="--" if p == "p50" else ":")  # fmt: skip
    ax.set_xlabel("round (markers: per round; lines: pooled)")
    ax.set_ylabel("Rank latency, ms (answered calls)")
    ax.set_xticks(range(1, result["settings"]["rounds"] + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, (name, side) in enumerate(sides.items()):
        pts = [(p, ms) for p, ms in side["pooled"]["cdf_ms"] if p < 100]
        ax.plot([1.0 / (1.0 - p / 100.0) for p, _ in pts], [ms for _, ms in pts], "o-", ms=2,
                color=f"C{i}", label=label[name])  # fmt: skip
    ticks = [50, 90, 99, 99.9]
    ax.set_xscale("log")
    ax.set_xticks([1 / (1 - t / 100) for t in ticks], [f"p{t:g}" for t in ticks])
    ax.set_ylabel("ms")
    ax.set_title("pooled over the rounds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ratio = result["b_over_a"]["pooled"]
    s = result["settings"]
    fig.suptitle(
        f"A/B interleaved ({'/'.join(s['order'])}), {result['items']:,} items, "
        f"{s['rate_rps']:g} Rank/s x {s['seconds']:g} s x {s['rounds']} rounds: B/A p50 "
        f"{ratio['p50'] or float('nan'):.3f}, p99 {ratio['p99'] or float('nan'):.3f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", required=True, help="a benchmarks.latency_budget work folder")
    ap.add_argument("--work-b", help="side B's own work folder (default: --work)")
    ap.add_argument("--a", required=True, help="DIR:MODULE, e.g. /work/old:sieve.cli")
    ap.add_argument("--b", required=True, help="DIR:MODULE, e.g. /work/main:app.cli")
    ap.add_argument("--a-workers", type=int, default=1, help="side A's --ranker-workers")
    ap.add_argument("--b-workers", type=int, default=1, help="side B's --ranker-workers")
    ap.add_argument("--a-shards", type=int, default=1, help="side A's --candidate-shards")
    ap.add_argument("--b-shards", type=int, default=1, help="side B's --candidate-shards")
    ap.add_argument("--rate", type=float, default=100.0, help="Rank/s (Poisson)")
    ap.add_argument("--seconds", type=float, default=30.0, help="recorded seconds per run")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds sent, not recorded")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="the load generator's, both sides")
    ap.add_argument("--config", help="default WORK/sieve.toml")
    ap.add_argument("--b-config", help="side B's config (default: --config), e.g. with TLS")
    ap.add_argument(
        "--a-loadgen-args", default="", help="more load generator options for side A, one string"
    )
    ap.add_argument(
        "--b-loadgen-args", default="", help="more load generator options for side B, one string"
    )
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    result = run(args)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "ab.png")
    for name, side in result["sides"].items():
        c, pool = result["checkouts"][name], side["pooled"]
        lat = pool["latency_ms"]
        print(
            f"{name} {c['checkout']} ({c['cli_module']}, {c['commit'][:10]}"
            f"{', dirty' if c['dirty'] else ''}): pooled p50 {lat.get('p50', 0):.2f} "
            f"p95 {lat.get('p95', 0):.2f} p99 {lat.get('p99', 0):.2f} ms, ok {pool['ok']}, "
            f"errors {pool['errors']}, rungs {100 * pool['rung_share']:.1f}%, CPU ms per "
            f"call {pool['cpu_ms_per_call']}"
        )
    cmp_ = result["b_over_a"]
    for r in cmp_["per_round"]:
        print(f"round {r['round'] + 1}: B/A p50 {_fmt(r['p50'])}  p99 {_fmt(r['p99'])}")
    for p in ("p50", "p99"):
        spread = cmp_["spread"][p]
        print(
            f"pooled B/A {p} {_fmt(cmp_['pooled'][p])}; round-to-round spread (max/min) "
            f"A {_fmt(spread['A'])} B {_fmt(spread['B'])}; within noise: {cmp_['within_noise'][p]}"
        )
    print(f"wrote {out / 'ab.json'} and ab.png")


if __name__ == "__main__":
    main()
