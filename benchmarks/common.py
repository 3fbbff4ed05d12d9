"""What the benchmarks share: percentile summaries and the on/off comparison plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def percentiles(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50 / p95 / p99 of ``values`` (same unit), with the sample count."""
    a = np.asarray(values, dtype=np.float64)
    out = {p: float(np.percentile(a, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}
    out["n"] = float(len(a))
    return out


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
