"""A sharded index against the whole one, on a sharded artifact set
(``[build] shards`` or ``candidate.shards.reshard``): recall against exact search
and search latency, both spaces, at the k the ranker asks each space for.

    python -m benchmarks.shards --artifacts /work/bench1m/artifacts [--queries 300]

For each space, a seeded sample of the set's stored user vectors is searched
one query at a time on one thread in the whole index and in every shard index,
with the set's own search parameters, interleaved query by query over
``--rounds`` rounds. The shards' answers are merged by score (the ranker's
``merge_top``). Recall is tie-tolerant, as in ``benchmarks.ann``. The merged
latency is the slowest shard's (shards search at once, in their own processes);
the summed one is the CPU the shards spend together. Writes
``benchmarks/results/shards.json`` and ``shards.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.ann import ground_truth, recall  # noqa: E402
from benchmarks.harness import RESULTS, machine, percentiles, pyplot  # noqa: E402
from candidate.index import parse_search_params, read_index, search_parameters  # noqa: E402
from candidate.shards import shard_role, shard_rows  # noqa: E402
from ranker.scatter import merge_top  # noqa: E402
from sieve import artifacts  # noqa: E402

SPACES = {
    "learned": ("index", "item_embeddings", "user_vectors"),
    "text": ("text_index", "text_embeddings", "text_user_vectors"),
}


def _timed(index: faiss.Index, q: np.ndarray, k: int, params: Any) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    scores, labels = index.search(q.reshape(1, -1), k, params=params)
    return (time.perf_counter() - t0) * 1e3, (labels[0], scores[0])  # type: ignore[return-value]


def space_run(
    aset: artifacts.ArtifactSet, space: str, k: int, args: argparse.Namespace
) -> dict[str, Any]:
    role, emb_role, user_role = SPACES[space]
    m = aset.manifest
    section = m.index if space == "learned" else m.text_index
    assert section is not None and m.shards is not None
    emb = np.ascontiguousarray(np.load(aset.verified(emb_role)), np.float32)
    with np.load(aset.verified(user_role)) as z:
        users = z["vectors"]
    pick = np.random.default_rng(args.seed).permutation(len(users))[: args.queries]
    q = np.ascontiguousarray(users[pick], np.float32)
    kth = ground_truth(emb, q, k, Path(args.cache))[:, k - 1]
    params = parse_search_params(section.search_params)
    whole = read_index(aset.verified(role), mmap=False)
    ids = aset.read_catalog(["item_id"])["item_id"].to_numpy(np.int64)
    count = m.shards.count
    rows = [shard_rows(ids, count, i) for i in range(count)]
    shards = [read_index(aset.verified(shard_role(role, i)), mmap=False) for i in range(count)]
    wp = search_parameters(whole, params, k, None)
    sp = [search_parameters(s, params, k, None) for s in shards]
    for i in range(20):  # warm-up
        _timed(whole, q[i % len(q)], k, wp)
        for s, p in zip(shards, sp, strict=True):
            _timed(s, q[i % len(q)], k, p)
    lat: dict[str, list[float]] = {"whole": [], "sharded_max": [], "sharded_sum": []}
    rec: dict[str, list[float]] = {"whole": [], "sharded": []}
    for rnd in range(args.rounds):
        for j in range(len(q)):
            ms, (labels, _) = _timed(whole, q[j], k, wp)
            lat["whole"].append(ms)
            parts, times = [], []
            for s, p, r in zip(shards, sp, rows, strict=True):
                ms, (lab, sc) = _timed(s, q[j], k, p)
                times.append(ms)
                keep = lab >= 0
                parts.append((r[lab[keep]], sc[keep]))
            lat["sharded_max"].append(max(times))
            lat["sharded_sum"].append(sum(times))
            if rnd == 0:
                merged, _ = merge_top(parts, k)  # catalog rows here, not item ids
                rec["whole"].append(recall(emb, q[j], labels, kth[j]))
                rec["sharded"].append(recall(emb, q[j], merged, kth[j]))
    rng = np.random.default_rng(args.seed)

    def interval(x: list[float]) -> list[float]:
        a = np.asarray(x)
        boots = [a[rng.integers(0, len(a), len(a))].mean() for _ in range(1000)]
        return [
            round(float(np.percentile(boots, 2.5)), 4),
            round(float(np.percentile(boots, 97.5)), 4),
        ]

    return {
        "k": k,
        "factory": section.factory,
        "search_params": section.search_params,
        "shard_sizes": list(m.shards.ntotal),
        "recall": {name: round(float(np.mean(v)), 4) for name, v in rec.items()},
        "recall_95ci": {name: interval(v) for name, v in rec.items()},
        "latency_ms": {name: percentiles(v) for name, v in lat.items()},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(result["spaces"]), figsize=(5 * len(result["spaces"]), 4))
    for ax, (space, r) in zip(np.atleast_1d(axes), result["spaces"].items(), strict=True):
        names = list(r["latency_ms"])
        x = np.arange(len(names))
        for off, p in ((-0.25, "p50"), (0.0, "p95"), (0.25, "p99")):
            ax.bar(x + off, [r["latency_ms"][n][p] for n in names], 0.25, label=p)
        ax.set_xticks(x, names)
        ax.set_ylabel("search ms (one thread)")
        ax.set_title(
            f"{space}, top-{r['k']}: recall whole {r['recall']['whole']:.3f}, "
            f"{len(r['shard_sizes'])} shards {r['recall']['sharded']:.3f}",
            fontsize=9,
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--artifacts", required=True, help="an artifact root whose live set is sharded")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=".bench-cache", help="ground-truth cache folder")
    ap.add_argument("--name", default="shards")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    aset = artifacts.load(Path(args.artifacts))
    if aset.manifest.shards is None:
        raise SystemExit(f"{args.artifacts}: set {aset.version} is not sharded")
    sources = aset.manifest.model.sources
    ks = {"learned": sources.get("learned", 1000), "text": sources.get("text", 100)}
    result: dict[str, Any] = {
        "set": aset.version,
        "n_items": aset.manifest.index.ntotal,
        "shards": aset.manifest.shards.count,
        "queries": args.queries,
        "rounds": args.rounds,
        "machine": machine(),
        "spaces": {},
    }
    for space, k in ks.items():
        if k > 0:
            result["spaces"][space] = space_run(aset, space, k, args)
            r = result["spaces"][space]
            print(
                f"{space} top-{k}: recall whole {r['recall']['whole']} "
                f"{r['recall_95ci']['whole']}, sharded {r['recall']['sharded']} "
                f"{r['recall_95ci']['sharded']}; p50/p99 ms "
                + ", ".join(
                    f"{n} {v['p50']:.2f}/{v['p99']:.2f}" for n, v in r["latency_ms"].items()
                ),
                flush=True,
            )
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{args.name}.png")
    print(f"wrote {out / args.name}.json and .png")


if __name__ == "__main__":
    main()
