"""The feedback loop's commands: ``sieve events``, ``sieve replay``, ``sieve skew``."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from app.config import load_config


def cmd_events(args: argparse.Namespace) -> int:
    from app.events import run_worker
    from sieve import logs

    cfg = load_config(Path(args.config) if args.config else None)
    logs.configure(cfg.logging)
    archive = Path(args.archive) if args.archive else None
    return run_worker(cfg, Path(args.artifacts), args.consumer, args.report_s, args.once, archive)


def cmd_replay(args: argparse.Namespace) -> int:
    from app.replay import replay, replay_plan
    from sieve import artifacts

    aset = artifacts.load(Path(args.artifacts))
    plan = replay_plan(aset, args.users, args.steps, args.seed)
    positive = float(aset.manifest.build.config.get("positive_rating", 4.0))
    report = asyncio.run(replay(args.frozen, args.fresh, plan, args.k, positive, args.gap_s))
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_skew(args: argparse.Namespace) -> int:
    from app.skew import skew_report

    report = skew_report(Path(args.log), Path(args.artifacts))
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def add_loop_commands(sub: Any) -> None:
    """Register the commands on ``sieve``'s subparsers."""
    e = sub.add_parser(
        "events", help="apply recorded events to the online features (a stream worker)"
    )
    e.add_argument(
        "--artifacts", default="artifacts", help="the artifact root served (default: artifacts)"
    )
    e.add_argument(
        "--consumer", default="", help="this worker's name in the group (default: host-pid)"
    )
    e.add_argument(
        "--report-s", type=float, default=10.0, help="seconds between count lines (default: 10)"
    )
    e.add_argument(
        "--once", action="store_true", help="stop when no entry is waiting (tests, backfills)"
    )
    e.add_argument(
        "--archive", metavar="DIR",
        help="archive the events as date-partitioned Parquet in DIR instead (the offline log)",
    )  # fmt: skip
    e.set_defaults(func=cmd_events)

    rp = sub.add_parser(
        "replay", help="play the holdout as events against a frozen and a fresh ranker"
    )
    rp.add_argument("--frozen", required=True, help="address of a ranker without events")
    rp.add_argument("--fresh", required=True, help="address of a ranker with [ranker.events] on")
    rp.add_argument(
        "--artifacts", default="artifacts", help="the artifact root both serve (default: artifacts)"
    )
    rp.add_argument("--users", type=int, default=100, help="users sampled (default: 100)")
    rp.add_argument("--steps", type=int, default=10, help="held-out ratings per user (default: 10)")
    rp.add_argument("--k", type=int, default=50, help="items per Rank (default: 50)")
    rp.add_argument(
        "--gap-s", type=float, default=1.5,
        help="the least seconds between a user's steps, for events to apply (default: 1.5)",
    )  # fmt: skip
    rp.add_argument("--seed", type=int, default=0, help="of the user sample (default: 0)")
    rp.add_argument("--out", help="also write the report (JSON) here")
    rp.set_defaults(func=cmd_replay)

    sk = sub.add_parser(
        "skew", help="training-serving skew per feature, from the ranker's feature log"
    )
    sk.add_argument("--log", required=True, help="[ranker.feature_log] dir")
    sk.add_argument(
        "--artifacts", default="artifacts", help="the artifact root (default: artifacts)"
    )
    sk.add_argument("--out", help="also write the report (JSON) here")
    sk.set_defaults(func=cmd_skew)
