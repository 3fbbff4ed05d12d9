"""Ranking quality on the held-out ratings, with bootstrap intervals over users.

    python -m benchmarks.quality --artifacts artifacts     # the live set there
    python -m benchmarks.quality --data DIR --seeds 0,1,2 --splits user,global

The second form builds a set per (split, seed) from any folder in the MovieLens
layout and evaluates each. The evaluation (what is ranked, by what, which
metrics, the baselines tuned on the validation split) is
``app.quality.evaluate``, which the tests run too; this module runs it, writes
``benchmarks/results/quality.{json,png}`` and ``quality_diversity.png`` (of the
first run).
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


HEADLINE = (
    ("funnel_recall", lambda r: r["funnel_recall"]),
    ("ann ndcg@10", lambda r: r["results"]["ann"]["ndcg@10"]["mean"]),
    ("popularity ndcg@10", lambda r: r["results"]["popularity"]["ndcg@10"]["mean"]),
    ("student ndcg@10", lambda r: r["results"]["student_fp32"]["ndcg@10"]["mean"]),
    ("student recall@50", lambda r: r["results"]["student_fp32"]["recall@50"]["mean"]),
    ("student/teacher", lambda r: r["ratios"]["student_fp32/teacher ndcg@10"]["ratio"]),
    ("int8/fp32", lambda r: r["ratios"]["student_int8/student_fp32 ndcg@10"]["ratio"]),
)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the targets are stated in, for one run."""
    out: dict[str, Any] = {name: round(float(get(result)), 4) for name, get in HEADLINE}
    b = result.get("baselines", {})
    for name, v in b.get("methods", {}).items():
        if "results" in v:
            out[f"{name} ndcg@10"] = round(v["results"]["ndcg@10"]["mean"], 4)
            out[f"{name} recall@funnel"] = round(v["recall_at_funnel_size"]["mean"], 4)
    if "student_fp32 / best ndcg@10" in b:
        r = b["student_fp32 / best ndcg@10"]
        out[f"student/{b['best']}"] = [round(r[k], 3) for k in ("ratio", "low", "high")]
    out["cold positives reached"] = result["cold_items"]
    return out


def runs(data: Path, work: Path, seeds: list[int], splits: list[str]) -> dict[str, Any]:
    """Build and evaluate a set per (split, seed) from ``data``."""
    from app.build import build
    from app.config import BuildConfig

    out: dict[str, Any] = {"data": str(data), "runs": []}
    for split in splits:
        for seed in seeds:
            root = work / f"{split}-seed{seed}"
            report = build(data, root, BuildConfig(seed=seed, split=split), work / "cache")
            result = evaluate(root)
            result["build_seconds"] = report.stage_seconds
            out["runs"].append(result)
            print(f"[quality] {split} seed {seed}: {json.dumps(headline(result))}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--data", help="a MovieLens-layout folder: build a set per split and seed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--splits", default="user,global")
    ap.add_argument("--work", default="/tmp/sieve-quality", help="where --data builds go")
    ap.add_argument("--name", default="quality")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.data:
        many = runs(
            Path(args.data),
            Path(args.work),
            [int(s) for s in args.seeds.split(",")],
            args.splits.split(","),
        )
        many["headline"] = [
            {"split": r["split"], "seed": r["seed"], **headline(r)} for r in many["runs"]
        ]
        (RESULTS / f"{args.name}.json").write_text(json.dumps(many, indent=2) + "\n")
        result = many["runs"][0]
        for row in many["headline"]:
            print(json.dumps(row))
    else:
        result = evaluate(Path(args.artifacts))
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
