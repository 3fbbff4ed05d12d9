"""Cost of the re-rank chain: 1200 scored candidates -> 50, every rule on.

    python -m benchmarks.rerank [--calls 3000]

Candidates as the ranker holds them (1000 from the search + 200 popular), 384-dim
L2-normalised embeddings in clusters, 20 genres, ages, 300 excluded ids, 200
recently shown items; seeded. Times, per call and interleaved so the machine's
noise hits all alike: the default chain, every rule on (explain off and on), MMR
alone at several pool sizes; and, side by side on the same 500 items, the
vectorised MMR against the textbook loop (``tests.oracles.naive_mmr``; a handful
of calls: it is slow).
Writes ``benchmarks/results/rerank.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS, machine, percentiles, pyplot
from ranker.config import RerankConfig
from ranker.rerank import (
    AllowCategories,
    Blocklist,
    Fatigue,
    Freshness,
    GroupCap,
    MinGroups,
    Mmr,
    PositionDecay,
    Rule,
    Seen,
    Slate,
    mmr,
    run_chain,
)
from sieve.data import GENRE_INDEX, GENRES
from sieve.ids import IdIndex
from tests.oracles import naive_mmr

N, DIM, K = 1200, 384, 50

ALL_RULES: tuple[Rule, ...] = (
    Seen(),
    Blocklist(item_ids=tuple(range(10_000, 10_100))),
    AllowCategories(categories=GENRES[:15]),
    Freshness(),
    Fatigue(),
    PositionDecay(),
    Mmr(),
    GroupCap(),
    MinGroups(n_groups=8),
)


def slate(seed: int = 0) -> tuple[Slate, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, DIM)).astype(np.float32)
    emb = centers[rng.integers(0, 40, N)] + 0.6 * rng.normal(size=(N, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = rng.choice(np.arange(1, 50_000), N, replace=False).astype(np.int64)
    primary = rng.integers(0, len(GENRES), N)
    genres = (rng.random((N, len(GENRES))) < 0.1).astype(np.float32)
    genres[np.arange(N), primary] = 1
    attrs: dict[str, np.ndarray] = {
        "primary_genre": primary,
        "genres": genres,
        "age_years": 20 * rng.random(N),
    }
    table = IdIndex(ids)
    recent = rng.choice(ids, 200, replace=False)
    s = Slate(
        ids=ids,
        attributes=attrs,
        embeddings_of=lambda idx: emb[idx],
        attribute_of=lambda item_ids, name: attrs[name][table.rows(item_ids)[0]],
        exclude=np.sort(rng.choice(np.arange(1, 50_000), 300, replace=False)),
        recent=recent,
        categories=GENRE_INDEX,
    )
    return s, rng.random(N).astype(np.float32)


def run(calls: int, naive_calls: int) -> dict[str, Any]:
    s, scores = slate()
    variants: dict[str, tuple[tuple[Rule, ...], bool]] = {
        "default_chain": (RerankConfig().rules, False),
        "all_rules": (ALL_RULES, False),
        "all_rules_explain": (ALL_RULES, True),
        **{f"mmr_pool_{p}": ((Mmr(pool=p),), False) for p in (100, 200, 500, 1000)},
        "no_rules": ((), False),
    }
    for rules, explain in variants.values():  # warm-up
        for _ in range(20):
            run_chain(rules, s, scores, K, explain)
    lat: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(calls):
        for name, (rules, explain) in variants.items():
            t0 = time.perf_counter()
            run_chain(rules, s, scores, K, explain)
            lat[name].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {name: percentiles(v) for name, v in lat.items()}

    # side by side on the same 500 items
    emb, rel = s.embeddings_of(np.arange(500)), scores[:500]
    fast, slow = [], []
    for _ in range(naive_calls):
        t0 = time.perf_counter()
        a = mmr(rel, emb, K, 0.7)
        fast.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        b = naive_mmr(rel, emb, K, 0.7)
        slow.append((time.perf_counter() - t0) * 1e3)
        assert a.tolist() == b, "vectorised and textbook MMR disagree"
    out["mmr_500_vectorised"] = percentiles(fast)
    out["mmr_500_naive"] = percentiles(slow)
    out["naive_over_vectorised_p50"] = (
        out["mmr_500_naive"]["p50"] / out["mmr_500_vectorised"]["p50"]
    )
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    names = [n for n, v in result["latency_ms"].items() if isinstance(v, dict) and "naive" not in n]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(names))
    for off, p in ((-0.2, "p50"), (0.0, "p95"), (0.2, "p99")):
        ax.bar(x + off, [result["latency_ms"][n][p] for n in names], 0.2, label=p)
    ax.axhline(2.0, color="red", ls="--", label="target p99 2 ms")
    ax.set_xticks(x, names, rotation=25)
    ax.set_ylabel("ms per request")
    ax.set_title(f"re-rank {N} -> {K} candidates, one thread")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--naive-calls", type=int, default=3)
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    # As `sieve serve` runs it: one BLAS thread (see app.cli.serve).
    with threadpool_limits(1, user_api="blas"):
        lat = run(args.calls, args.naive_calls)
    result = {
        "machine": machine(),
        "blas_threads": 1,
        "candidates": N,
        "k": K,
        "dim": DIM,
        "all_rules": [r.model_dump(by_alias=True) for r in ALL_RULES],
        "latency_ms": lat,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rerank.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "rerank.png")
    for name, v in lat.items():
        if isinstance(v, dict):
            print(f"{name:<20} p50 {v['p50']:8.3f}  p95 {v['p95']:8.3f}  p99 {v['p99']:8.3f} ms")
    print(f"naive / vectorised MMR (500 items, k={K}): {lat['naive_over_vectorised_p50']:.0f}x")
    print(f"wrote {RESULTS / 'rerank.json'} and .png")


if __name__ == "__main__":
    main()
