"""What freshness buys: ``sieve replay`` on a MovieLens set, several seeds.

    python -m benchmarks.replay --artifacts artifacts --work /tmp/replay \\
        [--users 200 --steps 10 --seeds 0,1,2]

For each seed, a fresh copy of the live set under ``WORK/seed<S>`` (no event has
touched it), the stream's ``redis-server`` (AOF), the candidate service, two
rankers of the set with the default rule chain (one without events: frozen; one
with ``[ranker.events]``: fresh), one ``sieve events`` worker; then the replay
(``app/replay.py``) of ``--users`` users' first ``--steps`` held-out ratings,
``--gap-s`` at least between a user's steps. Writes
``RESULTS/replay/replay.json`` and ``replay.png`` (hit rate per seed with its
interval, both rankers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.replay import replay, replay_plan
from benchmarks.freshness import wait_for_workers
from benchmarks.harness import RESULTS, ROOT, machine, process, pyplot, serving
from sieve import artifacts
from sieve.local_redis import free_port, start_redis, wait_for_redis


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    work = Path(args.work).resolve() / f"seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    live = artifacts.resolve(Path(args.artifacts))
    root = work / "artifacts"
    shutil.copytree(live, root / "versions" / live.name)
    artifacts.publish(root, live.name)
    port = free_port()
    frozen_cfg = work / "frozen.toml"
    frozen_cfg.write_text("")
    fresh_cfg = work / "fresh.toml"
    fresh_cfg.write_text(
        f'[ranker.events]\nenabled = true\nredis_url = "redis://127.0.0.1:{port}/0"\n'
    )
    (work / "redis").mkdir()
    redis_proc = start_redis(port, work / "redis", ("--appendonly", "yes"))
    try:
        wait_for_redis(redis_proc, port)
        with (
            serving("candidate", frozen_cfg, root, work, "candidate.log", 300,
                    "--candidate-port", "0") as (_, cport),
            serving("ranker", frozen_cfg, root, work, "frozen.log", 300, "--ranker-port", "0",
                    "--candidate-address", f"127.0.0.1:{cport}",
                    ready_name="frozen") as (_, frozen_port),
            serving("ranker", fresh_cfg, root, work, "fresh.log", 300, "--ranker-port", "0",
                    "--candidate-address", f"127.0.0.1:{cport}",
                    ready_name="fresh") as (_, fresh_port),
            process([sys.executable, "-m", "app.cli", "--config", str(fresh_cfg), "events",
                     "--artifacts", str(root), "--consumer", "w0"],
                    work / "logs" / "worker.log", cwd=ROOT),
        ):  # fmt: skip
            wait_for_workers([(work / "logs" / "worker.log", 0)])  # events would wait for it
            aset = artifacts.load(root)
            plan = replay_plan(aset, args.users, args.steps, seed)
            positive = float(aset.manifest.build.config.get("positive_rating", 4.0))
            report = asyncio.run(
                replay(
                    f"127.0.0.1:{frozen_port}",
                    f"127.0.0.1:{fresh_port}",
                    plan,
                    args.k,
                    positive,
                    args.gap_s,
                )  # fmt: skip
            )
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
    report["seed"] = seed
    print(json.dumps(report), flush=True)
    return report


def plot(result: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, mode in enumerate(("frozen", "fresh")):
        xs = [i + (n - 0.5) * 0.2 for i in range(len(result["seeds"]))]
        h = [r[f"hit_rate_{mode}"] for r in result["seeds"]]
        ax.errorbar(xs, [x["mean"] for x in h],
                    yerr=[[x["mean"] - x["low"] for x in h], [x["high"] - x["mean"] for x in h]],
                    fmt="o", capsize=4, label=mode)  # fmt: skip
    ax.set_xticks(range(len(result["seeds"])), [f"seed {r['seed']}" for r in result["seeds"]])
    ax.set_ylabel(f"hit rate of the next item in the top {result['args']['k']}")
    ax.set_title("the holdout replayed: frozen build vs events applied (95% intervals)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "replay.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", required=True, help="an artifact root built from MovieLens")
    ap.add_argument("--work", required=True)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--gap-s", type=float, default=1.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--results", default=str(RESULTS / "replay"))
    args = ap.parse_args()
    seeds = [one_seed(args, int(s)) for s in args.seeds.split(",")]
    result = {"machine": machine(), "args": vars(args), "seeds": seeds,
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True).stdout.strip()}  # fmt: skip
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(result, indent=1))
    plot(result, out)


if __name__ == "__main__":
    main()
