"""Ranking quality on the held-out ratings, with bootstrap intervals over users.

    python -m benchmarks.quality --artifacts artifacts

The evaluation (what is ranked, by what, and which metrics) is
``app.quality.evaluate``, which the tests run too; this module runs it, writes
``benchmarks/results/quality.{json,png}`` and ``quality_diversity.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.quality import METRICS, evaluate
from benchmarks.harness import RESULTS, pyplot


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    names = list(result["results"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(14, 3.8))
    for ax, mt in zip(axes, METRICS, strict=True):
        r = [result["results"][n][mt] for n in names]
        err = [[x["mean"] - x["low"] for x in r], [x["high"] - x["mean"] for x in r]]
        ax.bar(
            names,
            [x["mean"] for x in r],
            yerr=err,
            capsize=4,
            color=[f"C{i}" for i in range(len(names))],
        )
        ax.set_title(mt)
        ax.tick_params(axis="x", rotation=35)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"MovieLens holdout, {result['users']} users, 95% bootstrap intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_diversity(result: dict[str, Any], path: Path) -> None:
    """NDCG@10 against diversity, each as a paired ratio to plain score order."""
    plt = pyplot()
    rows = result["diversity"]["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, mt in zip(axes, ("ild@50", "genre_ild@50"), strict=True):
        for i, (name, r) in enumerate(rows.items()):
            x, y = r[f"{mt} / score_order"], r["ndcg@10 / score_order"]
            ax.errorbar(
                x["ratio"],
                y["ratio"],
                xerr=[[x["ratio"] - x["low"]], [x["high"] - x["ratio"]]],
                yerr=[[y["ratio"] - y["low"]], [y["high"] - y["ratio"]]],
                fmt="o",
                color="red" if name == "default" else f"C{i % 10}",
                capsize=3,
                alpha=0.8,
            )
            ax.annotate(
                name,
                (x["ratio"], y["ratio"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.axhline(0.97, color="grey", ls="--", lw=1, label="NDCG@10 -3%")
        ax.axvline(1.2, color="grey", ls=":", lw=1, label="diversity +20%")
        ax.set_xlabel(f"{mt} / score order (top 50)")
        ax.set_ylabel("NDCG@10 / score order")
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Re-rank settings over the student FP32, MovieLens holdout, {result['users']} users "
        "(paired 95% bootstrap intervals)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--name", default="quality")
    args = ap.parse_args()
    result = evaluate(Path(args.artifacts))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{args.name}.png")
    plot_diversity(result, RESULTS / f"{args.name}_diversity.png")
    print(f"{result['users']} users with relevant held-out items")
    for name, metrics in result["results"].items():
        cells = "  ".join(
            f"{mt} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]" for mt, v in metrics.items()
        )
        print(f"{name:<13} {cells}")
    for name, v in result["ratios"].items():
        print(f"{name}: {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}] (paired bootstrap)")
    print("re-rank settings (student FP32): NDCG@10, ILD@50 and ratios to score order")
    for name, r in result["diversity"]["settings"].items():
        n, i = r["ndcg@10 / score_order"], r["ild@50 / score_order"]
        gi = r["genre_ild@50 / score_order"]
        print(
            f"  {name:<20} ndcg@10 {r['ndcg@10']['mean']:.4f} ({n['ratio']:.3f} "
            f"[{n['low']:.3f}, {n['high']:.3f}])  ild@50 {r['ild@50']['mean']:.4f} "
            f"({i['ratio']:.3f} [{i['low']:.3f}, {i['high']:.3f}])  ild@10 "
            f"{r['ild@10']['mean']:.4f}  genre_ild@50 {r['genre_ild@50']['mean']:.4f} "
            f"({gi['ratio']:.3f})  genres@50 {r['genre_coverage@50']['mean']:.3f}"
        )
    print(
        f"funnel recall (relevant held-out items among the candidates): "
        f"{result['funnel_recall']:.3f}"
    )
    print(f"wrote {RESULTS / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
