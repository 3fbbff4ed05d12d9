"""What every benchmark shares: the machine record, percentiles, HDR histograms,
the latency budget's lines, processes on loopback, the load generator, the
benchmark work folder (Redis, the synthetic set, the users file) and plots.

Nothing outside ``benchmarks/`` imports this module (import-linter forbids it).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hdrh.histogram import HdrHistogram

from ranker.config import StageBudgetMs
from sieve.local_redis import free_port

if TYPE_CHECKING:
    from sieve.artifacts import ArtifactSet

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CLI_MODULE = "app.cli"
SIEVE = [sys.executable, "-m", CLI_MODULE]


# -- the machine --------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: platform, Python, CPU model and
    count, memory (GB)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]
        mem_gb = round(int(kb) / 2**20, 1)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory_gb": mem_gb,
    }


# -- percentiles --------------------------------------------------------------


def percentiles(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50 / p95 / p99 of ``values`` (same unit; numpy's linear interpolation),
    with the sample count ``n``."""
    a = np.asarray(values, dtype=np.float64)
    out = {p: float(np.percentile(a, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}
    out["n"] = float(len(a))
    return out


# -- HDR histograms (microseconds in, milliseconds out) -----------------------

HDR_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
CDF_PERCENTILES = (
    *np.round(np.linspace(0, 90, 19), 1).tolist(),
    *(91, 92, 93, 94, 95, 96, 97, 98, 99, 99.5, 99.9, 99.99, 100),
)
HDR_MAX_US = 60_000_000


def histogram() -> HdrHistogram:
    """An empty latency histogram: 1 us to 60 s, 3 significant digits."""
    return HdrHistogram(1, HDR_MAX_US, 3)


def hdr_record(h: HdrHistogram, micros: int) -> None:
    """Record ``micros``, clamped into the histogram's range."""
    h.record_value(min(max(1, micros), HDR_MAX_US))


def hdr_summary(h: HdrHistogram) -> dict[str, float]:
    """Percentiles (``HDR_PERCENTILES``), max and mean of a microsecond histogram,
    in ms, and the count ``n`` (``{"n": 0}`` when empty)."""
    if h.get_total_count() == 0:
        return {"n": 0}
    out = {f"p{p:g}": h.get_value_at_percentile(p) / 1e3 for p in HDR_PERCENTILES}
    out["max"] = h.get_max_value() / 1e3
    out["mean"] = h.get_mean_value() / 1e3
    out["n"] = h.get_total_count()
    return out


def hdr_cdf(h: HdrHistogram) -> list[tuple[float, float]]:
    """(percentile, ms) pairs of a microsecond histogram, for a latency CDF plot."""
    return [(float(p), h.get_value_at_percentile(p) / 1e3) for p in CDF_PERCENTILES]


def hdr_decode(encoded: str) -> HdrHistogram:
    """A histogram back from its ``encode()`` text (the load generator's ``hdr``)."""
    return HdrHistogram.decode(encoded)


def hdr_merge(encoded: Sequence[str]) -> HdrHistogram:
    """One histogram adding up several encoded ones (pooled runs)."""
    total = histogram()
    for e in encoded:
        total.add(hdr_decode(e))
    return total


# -- the latency budget -------------------------------------------------------

BUDGET_LINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "parse, validate, user features": ("user_features", ("validate", "user_features")),
    "candidate RPC (ANN + seen filter)": ("retrieve", ("retrieve",)),
    "item features": ("item_features", ("item_features",)),
    "scoring incl. batching wait": ("score", ("score",)),
    "re-rank": ("rerank", ("rerank",)),
    "serialisation, network hops": ("hops", ("client_overhead",)),
}
"""Each line of the latency budget as reported: the ``StageBudgetMs`` field that
sets it and the server stages (from the response; ``client_overhead``: what the
server did not account for) it covers."""

_BUDGET = StageBudgetMs()
BUDGET_MS: dict[str, tuple[float, tuple[str, ...]]] = {
    line: (float(getattr(_BUDGET, field)), stages) for line, (field, stages) in BUDGET_LINES.items()
}
"""Line -> (p99 budget ms, the stages it covers), from the ranker's own defaults."""
HEADROOM_MS = float(_BUDGET.headroom)
TOTAL_BUDGET_MS = float(sum(_BUDGET.model_dump().values()))
"""Every line plus the headroom: the whole Rank's p99 budget."""


FULL_QUALITY_RUNG_SHARE = 0.01
"""At most this share of a run's answers may take a rung of the degradation
ladder (fewer candidates, cached answer, ANN order, popular items) for the run
to count as served at full quality."""


def rung_share(run: dict[str, Any]) -> float:
    """The share of a load generator run's answers that took at least one rung."""
    return float(run["answers_on_a_rung"]) / max(1, run["ok"])


# -- processes on loopback ----------------------------------------------------


@contextlib.contextmanager
def process(cmd: list[str], log: Path, cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in ``cwd`` (output appended to ``log``); SIGTERM, then SIGKILL
    after 30 s, on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def serving(
    only: str,
    config: Path,
    root: Path,
    work: Path,
    log_name: str,
    timeout_s: float,
    *flags: str,
    checkout: Path = ROOT,
    cli_module: str = CLI_MODULE,
    ready_name: str = "",
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``python -m CLI_MODULE serve --only ONLY`` of ``checkout`` (run there, so
    its packages are the ones imported) as a process, output to
    ``work/logs/log_name``; yields it and its port once it serves, SIGTERM on
    the way out. Its ready file is ``work/ONLY.ready`` (``ready_name`` instead of
    ONLY, for several processes of one kind)."""
    ready, log = work / f"{ready_name or only}.ready", work / "logs" / log_name
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", cli_module, "--config", str(config), "serve", "--only", only,
           "--artifacts", str(root), "--ready-file", str(ready), *flags]  # fmt: skip
    with process(cmd, log, cwd=checkout) as proc:
        yield proc, wait_ready(proc, ready, log, timeout_s)


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path, timeout_s: float) -> int:
    """The port a ``serve --ready-file`` process reports once it serves.

    Raises:
        RuntimeError: it exited or was not ready within ``timeout_s`` (with the
            tail of its log).
    """
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(proc.args)} did not start:\n{tail}")  # type: ignore[arg-type]
        time.sleep(0.2)
    time.sleep(0.1)
    return int(ready.read_text().split()[1])


# -- the load generator -------------------------------------------------------


def loadgen_command(address: str, rate: float, duration: float, warmup: float, users: Path,
                    out: Path, seed: int, extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The command line of one load generator process (``benchmarks.loadgen``);
    ``extra``: more of its options (TLS, a token)."""
    return [
        sys.executable, "-m", "benchmarks.loadgen", "--address", address, "--rate", str(rate),
        "--duration", str(duration), "--warmup", str(warmup), "--users-file", str(users),
        "--out", str(out), "--seed", str(seed), *extra,
    ]  # fmt: skip


def loadgen(address: str, rate: float, duration: float, warmup: float, users: Path,
            out: Path, seed: int, extra: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """Run one load generator process to the end; its result (also in ``out``)."""
    cmd = loadgen_command(address, rate, duration, warmup, users, out, seed, extra)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return dict(json.loads(out.read_text()))


# -- the benchmark work folder ------------------------------------------------


def redis_port_of(work: Path) -> int:
    """The Redis port of a work folder (chosen once, kept in ``work/redis/port``:
    the built feature store's ``feature_store.yaml`` names it)."""
    (work / "redis").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    port_file = work / "redis" / "port"
    port = int(port_file.read_text()) if port_file.exists() else free_port()
    port_file.write_text(str(port))
    return port


def bench_config(work: Path, redis_port: int, extra: str = "", name: str = "sieve.toml") -> Path:
    """``work/name``: Redis online store and Redis shown-history, then ``extra``
    (more TOML tables)."""
    path = work / name
    path.write_text(
        "[build.online_store]\n"
        'type = "redis"\n'
        f'connection_string = "127.0.0.1:{redis_port}"\n\n'
        "[ranker.rerank.history]\n"
        'store = "redis"\n'
        f'redis_url = "redis://127.0.0.1:{redis_port}/1"\n' + extra
    )
    return path


def reliability(max_in_flight: int | None, cpu_threads: int | None = None) -> str:
    """A ``[ranker.reliability]`` table: the bound on Rank calls in flight (gRPC's
    own bound one above it, the default) and the request path's CPU threads; ""
    where both are the defaults."""
    lines = [
        f"{k} = {v}"
        for k, v in (("max_in_flight", max_in_flight), ("cpu_threads", cpu_threads))
        if v is not None
    ]
    return "\n[ranker.reliability]\n" + "\n".join(lines) + "\n" if lines else ""


def build_once(root: Path, items: int, config: Path, redis_address: str) -> float | None:
    """Build a synthetic set of ``items`` items into ``root`` with the Redis online
    store, unless one is there whose model is the one a build makes now (the
    features this code computes, the default student's shape), and save the
    materialized store (``SAVE``) so a restarted Redis loads it.
    Returns the build's seconds (None: reused)."""
    import redis

    from app.reuse import model_differs
    from sieve import artifacts

    if (root / artifacts.CURRENT).exists():
        differs = model_differs(artifacts.load(root).manifest.model)
        if not differs:
            return None
        print(f"the set in {root} has another model ({differs}): building a new version")
    t0 = time.perf_counter()
    print(f"building {items} synthetic items with the Redis online store ...")
    subprocess.run(
        [*SIEVE, "--config", str(config), "build", "--synthetic", str(items), "--out", str(root)],
        check=True,
        cwd=ROOT,
    )
    host, port = redis_address.split(":")
    redis.Redis(host=host, port=int(port)).save()  # keep the materialized store
    return round(time.perf_counter() - t0, 1)


def users_sample(aset: ArtifactSet, work: Path, n: int = 5000) -> Path:
    """``work/users.txt``: ``n`` user ids of the set (seeded sample), for the load
    generator."""
    import pandas as pd

    users = pd.read_parquet(aset.verified("user_features"), columns=["user_id"])["user_id"]
    users_file = work / "users.txt"
    np.savetxt(users_file, np.random.default_rng(0).permutation(users.to_numpy())[:n], fmt="%d")
    return users_file


def item_count(aset: ArtifactSet) -> int:
    """Items in the set's catalog."""
    return len(aset.read_catalog(["item_id"]))


# -- plots --------------------------------------------------------------------


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_on_off(
    rows: dict[str, Any],
    path: Path,
    rate_label: str,
    title: str,
    modes: dict[str, str] | None = None,
) -> None:
    """Throughput and latency against concurrency, batching off beside on.

    Args:
        rows: ``{"concurrency_N": {"off": {...}, "on": {...}}}`` with ``rps``, ``p50``, ``p99``.
        modes: the keys of each row to plot, with their legend labels (default:
            ``off`` and ``on``).
    """
    plt = pyplot()
    levels = [int(k.split("_")[1]) for k in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    modes = modes or {"off": "batching off", "on": "batching on"}
    for n, (mode, label) in enumerate(modes.items()):
        color = f"C{n}"
        r = [rows[f"concurrency_{lv}"][mode] for lv in levels]
        axes[0].plot(levels, [x["rps"] for x in r], "o-", color=color, label=label)
        axes[1].plot(levels, [x["p99"] for x in r], "o-", color=color, label=f"{label} p99")
        axes[1].plot(levels, [x["p50"] for x in r], "o--", color=color, label=f"{label} p50")
    axes[0].set_ylabel(rate_label)
    axes[1].set_ylabel("latency, ms")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent callers")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
