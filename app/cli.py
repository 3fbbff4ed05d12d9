"""The ``sieve`` command: build, serve, rank, quickstart."""

from __future__ import annotations

import os

# Set the thread policy before anything imports faiss or onnxruntime: passive
# OpenMP waits keep Faiss's idle threads from spinning against ONNX Runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pydantic  # noqa: E402

from app.config import SieveConfig, load_config  # noqa: E402
from app.loop_cli import add_loop_commands  # noqa: E402
from sieve.errors import ConfigError, SieveError  # noqa: E402
from sieve.local_redis import free_port  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd

    from app.build import BuildReport
    from protos.sieve.v1 import sieve_pb2

log = logging.getLogger("sieve")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sieve"


def _config(args: argparse.Namespace) -> SieveConfig:
    return load_config(Path(args.config) if args.config else None)


# ------------------------------------------------------------------- build --


def cmd_build(args: argparse.Namespace) -> int:
    from app.build import build

    cfg = _config(args)
    if bool(args.data) == bool(args.synthetic):
        print(
            "sieve build: give either --data DIR (ml-latest-small layout) or --synthetic N",
            file=sys.stderr,
        )
        return 2
    report = build(
        Path(args.data) if args.data else None,
        Path(args.out),
        cfg.build,
        Path(args.cache) if args.cache else None,
        synthetic=args.synthetic or 0,
        events_dir=Path(args.events) if args.events else None,
    )
    _print_build(report)
    return 0


def _print_build(report: BuildReport) -> None:
    print(f"\nartifact set {report.version} -> {report.root}")
    for stage, secs in report.stage_seconds.items():
        print(f"  {stage:<40} {secs:8.1f} s")


# ------------------------------------------------------------------- serve --


async def serve(
    cfg: SieveConfig, artifacts_root: Path, only: str | None, ready_file: Path | None = None
) -> None:
    """Run the candidate and/or ranker server until SIGTERM or SIGINT."""
    from threadpoolctl import threadpool_limits

    from candidate.service import create_server as create_candidate
    from ranker.service import create_server as create_ranker

    # One BLAS thread: a request's small matrix products (MMR's 200 x 200) split
    # over two threads wait for a core the other processes hold.
    # Re-rank p90 4.3 ms vs 12.5 ms with two (BENCHMARKS.md, Re-rank cost).
    threadpool_limits(1, user_api="blas")
    servers = []
    ranker_cfg = cfg.ranker
    try:
        if only in (None, "candidate"):
            server, _ = await create_candidate(cfg.candidate, artifacts_root)
            servers.append(("candidate", server, cfg.candidate.grace_s, cfg.candidate.drain_s))
            if only is None:  # the ranker talks to the port actually bound
                ranker_cfg = ranker_cfg.model_copy(
                    update={"candidate_address": f"{cfg.candidate.host}:{server.port}"}
                )
        if only in (None, "ranker"):
            rserver, pipeline = await create_ranker(ranker_cfg, artifacts_root)
            servers.append(("ranker", rserver, ranker_cfg.grace_s, ranker_cfg.drain_s))
    except BaseException:
        for _, s, _, _ in servers:
            await s.stop(0)
        raise
    # Start-up garbage (Feast's import alone leaves ~177k objects) must not be
    # walked by every full collection on the request path.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lines = [
        f"{name} serving on {ranker_cfg.host if name == 'ranker' else cfg.candidate.host}:{s.port}"
        + (f" (metrics on :{s.metrics_port}/metrics)" if s.metrics_port >= 0 else "")
        for name, s, _, _ in servers
    ]
    print("; ".join(lines), flush=True)
    if ready_file is not None:
        ready_file.write_text(
            "".join(
                f"{name} {s.port}"
                + (f" metrics {s.metrics_port}" if s.metrics_port >= 0 else "")
                + "\n"
                for name, s, _, _ in servers
            )
        )
    await stop.wait()
    print("shutting down (grace period for in-flight calls)", flush=True)
    # The entry point first, so it stops taking calls before its backend goes.
    for _, s, grace, drain in reversed(servers):
        await s.stop(grace, drain)


def cmd_serve(args: argparse.Namespace) -> int:
    from sieve import logs

    cfg = _config(args)
    logs.configure(cfg.logging)
    updates_c: dict[str, object] = (
        {"port": args.candidate_port} if args.candidate_port is not None else {}
    )
    if args.shard is not None:
        updates_c["shard"] = args.shard
    updates_r: dict[str, object] = (
        {"port": args.ranker_port} if args.ranker_port is not None else {}
    )
    if args.candidate_address:
        updates_r["candidate_address"] = args.candidate_address
    if args.candidate_shard:
        updates_r["candidate_shards"] = tuple(args.candidate_shard)
    if args.ranker_metrics_port is not None:
        updates_r["reliability"] = cfg.ranker.reliability.model_copy(
            update={"metrics_port": args.ranker_metrics_port}
        )
    cfg = cfg.model_copy(
        update={
            "candidate": cfg.candidate.model_copy(update=updates_c),
            "ranker": cfg.ranker.model_copy(update=updates_r),
        }
    )
    ready = Path(args.ready_file) if args.ready_file else None
    if args.ranker_workers < 1:
        raise ConfigError(f"--ranker-workers must be at least 1, got {args.ranker_workers}")
    if args.candidate_shards < 1:
        raise ConfigError(f"--candidate-shards must be at least 1, got {args.candidate_shards}")
    if args.ranker_workers > 1 or args.candidate_shards > 1:
        from app.workers import Supervisor, check_shared_state

        if args.only == "candidate" and args.ranker_workers > 1:
            raise ConfigError("--ranker-workers goes with the ranker: drop --only candidate")
        if args.only == "ranker" and args.candidate_shards > 1:
            raise ConfigError(
                "--candidate-shards starts candidate processes: drop --only ranker "
                "(and name running shards with --candidate-shard)"
            )
        check_shared_state(cfg, args.ranker_workers)
        base = [
            sys.executable,
            "-m",
            "app.cli",
            *(["--config", args.config] if args.config else []),
        ]
        base += ["serve", "--artifacts", args.artifacts, "--loop", args.loop]
        supervisor = Supervisor(
            cfg,
            base,
            args.ranker_workers,
            args.only,
            args.candidate_address,
            ready,
            shards=args.candidate_shards,
        )
        return supervisor.run()
    main = serve(cfg, Path(args.artifacts), args.only, ready)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
    return 0


# -------------------------------------------------------------------- rank --


async def rank_once(
    address: str,
    user_id: int,
    k: int,
    exclude: list[int],
    timeout_s: float = 10.0,
    debug: bool = False,
) -> sieve_pb2.RankResponse:
    import grpc

    from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
    from sieve.grpc_server import client_options

    # round_robin: --address may list ranker workers (ipv4:127.0.0.1:P,127.0.0.1:Q)
    async with grpc.aio.insecure_channel(address, options=client_options()) as channel:
        stub = sieve_pb2_grpc.RankerServiceStub(channel)
        return await stub.Rank(
            sieve_pb2.RankRequest(user_id=user_id, k=k, exclude_item_ids=exclude, debug=debug),
            timeout=timeout_s,
        )


def _column(catalog: pd.DataFrame | None, name: str) -> dict[int, object]:
    """item id -> a catalog column (empty without a catalog)."""
    if catalog is None:
        return {}
    return dict(zip(catalog["item_id"], catalog[name], strict=True))


def format_response(
    resp: sieve_pb2.RankResponse, catalog: pd.DataFrame | None, user_id: int
) -> str:
    """The table ``sieve rank`` and the quickstart print."""
    titles = _column(catalog, "title")
    genres = _column(catalog, "genres")
    out = [f"\nuser {user_id}: {len(resp.items)} items (artifact set {resp.artifact_version})"]
    out.append(f"{'#':>3}  {'title':<48} {'genres':<34} {'cand':>6} {'score':>6}  sources")
    for pos, item in enumerate(resp.items, 1):
        title = str(titles.get(item.item_id, f"item {item.item_id}"))[:48]
        g = str(genres.get(item.item_id, ""))[:34]
        out.append(
            f"{pos:>3}  {title:<48} {g:<34} {item.candidate_score:6.3f} "
            f"{item.final_score:6.3f}  {','.join(item.sources)}"
        )
    stages = "  ".join(f"{t.stage} {t.micros / 1000:.2f}" for t in resp.timings)
    out.append(f"stage times (ms): {stages}")
    out.append(f"degradations: {', '.join(resp.degradations) if resp.degradations else 'none'}")
    return "\n".join(out)


def format_debug(resp: sieve_pb2.RankResponse, catalog: pd.DataFrame | None) -> str:
    """What ``sieve rank --debug`` adds: per item where it came from, what the model
    and the rules did to it; the dropped items and why; the rungs taken."""
    titles = _column(catalog, "title")
    out = ["", f"{'#':>3}  {'title':<40} {'cand#':>5} {'model':>7} {'final':>7}  moved by"]
    for pos, item in enumerate(resp.items, 1):
        title = str(titles.get(item.item_id, f"item {item.item_id}"))[:40]
        rank = str(item.candidate_rank) if item.candidate_rank >= 0 else "-"
        moved = ", ".join(item.moved_by) if item.moved_by else "-"
        out.append(
            f"{pos:>3}  {title:<40} {rank:>5} {item.model_score:7.3f} "
            f"{item.final_score:7.3f}  {moved}"
        )
    out.append(f"dropped by the rules: {len(resp.dropped)}")
    for d in resp.dropped:
        title = str(titles.get(d.item_id, f"item {d.item_id}"))[:40]
        out.append(f"     {title:<40} {d.rule:<16} {d.reason} (model {d.model_score:.3f})")
    out.append(f"rungs: {', '.join(resp.rungs) if resp.rungs else 'none (full quality)'}")
    return "\n".join(out)


def _catalog(artifacts_root: Path | None) -> pd.DataFrame | None:
    if artifacts_root is None:
        return None
    import pandas as pd

    from sieve import artifacts

    try:
        return pd.read_parquet(artifacts.load(artifacts_root).path("catalog"))
    except (SieveError, OSError):
        return None


def cmd_rank(args: argparse.Namespace) -> int:
    import grpc

    try:
        resp = asyncio.run(
            rank_once(args.address, args.user, args.k, args.exclude or [], debug=args.debug)
        )
    except grpc.RpcError as e:
        print(f"sieve rank: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    catalog = _catalog(Path(args.artifacts))
    print(format_response(resp, catalog, args.user))
    if args.debug:
        print(format_debug(resp, catalog))
    return 0


# -------------------------------------------------------------- quickstart --


QUICKSTART_SYNTHETIC_ITEMS = 20_000


def resolve_data(data: str | None, cache_dir: Path, url: str) -> Path | None:
    """--data, else MovieLens from GroupLens (cached); None means: fall back to the
    seeded synthetic catalog (said in one line)."""
    from sieve.data import fetch_movielens

    if data:
        return Path(data)
    try:
        return fetch_movielens(cache_dir, url)
    except Exception as e:  # any failure to fetch means: fall back, say so in one line
        print(
            f"could not download MovieLens from {url} ({type(e).__name__}: {e}); "
            f"using a seeded synthetic catalog of {QUICKSTART_SYNTHETIC_ITEMS} items instead",
            flush=True,
        )
        return None


def cmd_quickstart(args: argparse.Namespace) -> int:
    from app.build import build

    cfg = _config(args)
    out = Path(args.out)
    data = resolve_data(args.data, Path(args.cache), args.url)
    synthetic = QUICKSTART_SYNTHETIC_ITEMS if data is None else 0
    report = build(data, out, cfg.build, Path(args.cache), synthetic=synthetic)
    _print_build(report)

    cport, rport = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        cmd = [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--artifacts",
            str(out),
            "--candidate-port",
            str(cport),
            "--ranker-port",
            str(rport),
            "--ready-file",
            str(ready),
        ]
        if args.config:
            cmd += ["--config", args.config]
        proc = subprocess.Popen(cmd)
        try:
            deadline = time.monotonic() + 180
            while not ready.exists():
                if proc.poll() is not None:
                    print("sieve serve exited before it was ready", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print("sieve serve was not ready within 180 s", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            catalog = _catalog(out)
            users = [int(u) for u in args.users.split(",")]
            for user in users:
                resp = asyncio.run(rank_once(f"127.0.0.1:{rport}", user, 50, []))
                print(format_response(resp, catalog, user))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print(
        f"\nquickstart done: `sieve serve --artifacts {out}` serves this set; "
        f"`sieve rank --user 42` asks it."
    )
    return 0


# -------------------------------------------------------------------- main --


def parser() -> argparse.ArgumentParser:
    """The ``sieve`` command line: every option says what it does (``--help``)."""
    from sieve.data import GROUPLENS_URL

    p = argparse.ArgumentParser(prog="sieve", description=__doc__)
    p.add_argument("--config", help="sieve.toml (defaults when absent)")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="run the offline jobs into a versioned artifact set")
    b.add_argument("--data", help="folder in the MovieLens ml-latest-small layout")
    b.add_argument(
        "--synthetic", type=int, metavar="N", help="build a seeded synthetic catalog of N items"
    )
    b.add_argument(
        "--out",
        default="artifacts",
        help="the artifact root: the set goes into OUT/versions/V, CURRENT names it "
        "(default: artifacts)",
    )
    b.add_argument("--cache", help="embedding cache folder (default: OUT/cache)")
    b.add_argument(
        "--events", metavar="DIR",
        help="an event log (sieve events --archive DIR): its ratings join the data's before "
        "the time split",
    )  # fmt: skip
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("serve", help="start the candidate and ranker gRPC servers")
    s.add_argument(
        "--artifacts", default="artifacts", help="the artifact root to serve (default: artifacts)"
    )
    s.add_argument(
        "--only", choices=["candidate", "ranker"], help="run one service (default: both)"
    )
    s.add_argument("--candidate-port", type=int, help="overrides [candidate] port (0: a free port)")
    s.add_argument("--ranker-port", type=int, help="overrides [ranker] port (0: a free port)")
    s.add_argument("--candidate-address", help="for --only ranker: where Retrieve is served")
    s.add_argument(
        "--shard",
        type=int,
        metavar="I",
        help="for --only candidate: serve shard I of a sharded set ([build] shards)",
    )
    s.add_argument(
        "--candidate-shard",
        action="append",
        metavar="ADDRESS",
        help="for --only ranker: a candidate shard's address, once per shard in shard "
        "order (overrides [ranker] candidate_shards)",
    )
    s.add_argument(
        "--candidate-shards",
        type=int,
        default=1,
        metavar="S",
        help="start S candidate processes, one per shard of the sharded set, from "
        "--candidate-port up, and point the ranker at all of them (app/workers.py)",
    )
    s.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the event loop: uvloop (default) costs a fifth less CPU per gRPC call "
        "than asyncio's own (BENCHMARKS.md, 'Where a Rank's CPU goes')",
    )
    s.add_argument(
        "--ranker-workers",
        type=int,
        default=1,
        metavar="N",
        help="ranker processes on this host, one port each from --ranker-port up "
        "(round_robin clients balance every call over them; app/workers.py)",
    )
    s.add_argument("--ranker-metrics-port", type=int, help=argparse.SUPPRESS)
    s.add_argument("--ready-file", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    add_loop_commands(sub)

    r = sub.add_parser("rank", help="ask the ranker for a user's recommendations")
    r.add_argument("--user", type=int, required=True, help="the user id to rank for")
    r.add_argument("--k", type=int, default=50, help="items to return (default: 50)")
    r.add_argument("--exclude", type=int, nargs="*", metavar="ID", help="item ids never to return")
    r.add_argument(
        "--debug",
        action="store_true",
        help="also print, per item, its candidate rank, model score and the rules that "
        "moved it, then the items the rules dropped and why, and the rungs taken",
    )
    r.add_argument(
        "--address",
        default="127.0.0.1:50062",
        help="the ranker: HOST:PORT, or ipv4:HOST:P,HOST:Q for workers (default: 127.0.0.1:50062)",
    )
    r.add_argument(
        "--artifacts", default="artifacts", help="the artifact root, for titles and genres"
    )
    r.set_defaults(func=cmd_rank)

    q = sub.add_parser("quickstart", help="build, serve, and rank a few users, end to end")
    q.add_argument("--data", help="MovieLens folder (default: download ml-latest-small)")
    q.add_argument("--out", default="artifacts", help="the artifact root (default: artifacts)")
    q.add_argument(
        "--cache",
        default=str(DEFAULT_CACHE),
        help=f"where the MovieLens download and embeddings are kept (default: {DEFAULT_CACHE})",
    )
    q.add_argument("--url", default=GROUPLENS_URL, help=argparse.SUPPRESS)
    q.add_argument(
        "--users", default="1,42,414", help="comma-separated users to rank (default: 1,42,414)"
    )
    q.set_defaults(func=cmd_quickstart)

    return p


def main(argv: list[str] | None = None) -> int:
    # Our own progress at INFO; libraries (Feast's registry, Faiss's loader, the
    # ONNX exporter) only when they warn.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("sieve", "candidate", "ranker", "features"):
        logging.getLogger(name).setLevel(logging.INFO)
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SieveError as e:
        print(f"sieve {args.cmd}: {e}", file=sys.stderr)
        return 1
    except (pydantic.ValidationError, tomllib.TOMLDecodeError) as e:
        print(f"sieve {args.cmd}: bad config {args.config}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
