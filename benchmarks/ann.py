"""ANN benchmark at scale: recall@k against exact search, single-query latency.

    python -m benchmarks.ann [--n 1000000] [--queries 300] [--k 1000]
    python -m benchmarks.ann --artifacts A --k 1200 --name ann_learned
    python -m benchmarks.ann --artifacts A --space text --k 100 --name ann_text_short

On the seeded synthetic catalog (``sieve.synthetic``) with user vectors as
queries (normalised mean of each user's positively rated items): exact ground
truth with ``IndexFlatIP`` (cached), exact Flat latency, then every index
setting below built once (cached under ``--cache``) and searched one query at a
time on one thread after a warm-up, every setting once per round over
``--rounds`` interleaved rounds (Flat included, on ``--flat-queries`` queries).
Recall is tie-tolerant: a result slot counts when it holds an item whose exact
score reaches the k-th exact score. Writes
``benchmarks/results/ann.json`` and ``ann.png`` (recall against p50 and p99,
Flat on the same plot) and prints the table with ratios to Flat. With
``--artifacts``, the set's learned item vectors and a sample of its stored user
vectors take the synthetic data's place (``LEARNED_SETTINGS``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.harness import RESULTS, machine, percentiles, pyplot  # noqa: E402
from candidate.index import (  # noqa: E402
    build_index,
    parse_search_params,
    read_index,
    search_parameters,
    write_index,
)
from sieve.synthetic import synthetic_catalog  # noqa: E402

SETTINGS: list[tuple[str, list[str]]] = [
    ("IVF4096,SQ8", [f"nprobe={n}" for n in (64, 128, 192, 384, 1024)]),
    ("IVF4096,PQ96x4fs,Refine(SQ8)", ["nprobe=128,k_factor=4", "nprobe=256,k_factor=8"]),
    (
        "IVF4096,PQ192x4fs,Refine(SQ8)",
        [
            "nprobe=256,k_factor=4",
            "nprobe=320,k_factor=4",
            "nprobe=1024,k_factor=8",
            "nprobe=2048,k_factor=10",
        ],
    ),
    # The same fast-scan shortlist re-ranked from fp16 codes: twice the bytes of
    # SQ8 but no per-dimension decode, about 0.2 us less per re-ranked row here.
    (
        "IVF4096,PQ192x4fs,Refine(SQfp16)",
        [
            "nprobe=256,k_factor=3",
            "nprobe=256,k_factor=4",
            "nprobe=288,k_factor=4",
            "nprobe=320,k_factor=4",
            "nprobe=352,k_factor=3",
            "nprobe=384,k_factor=3",
            "nprobe=512,k_factor=4",
            "nprobe=1024,k_factor=6",
            "nprobe=1536,k_factor=8",
            "nprobe=2048,k_factor=8",
            "nprobe=2048,k_factor=10",
        ],
    ),
    # The fast-scan codes encoding each vector's residual to its list centroid
    # (``fsr``) instead of the vector: finer codes for the same 96 bytes, so a
    # shorter shortlist (k_factor 3) keeps the recall. For inner product the
    # look-up table is still one per query: each list adds its centroid's score.
    (
        "IVF4096,PQ192x4fsr,Refine(SQfp16)",
        [
            "nprobe=256,k_factor=3",
            "nprobe=272,k_factor=3",
            "nprobe=288,k_factor=3",
            "nprobe=304,k_factor=3",
            "nprobe=320,k_factor=3",
            "nprobe=512,k_factor=3",
            "nprobe=1024,k_factor=5",
            "nprobe=1536,k_factor=6",
            "nprobe=2048,k_factor=8",
        ],
    ),
]


LEARNED_SETTINGS: list[tuple[str, list[str]]] = [
    ("IVF4096,Flat", [f"nprobe={n}" for n in (64, 128, 256, 384, 512, 768)]),
    ("IVF4096,SQfp16", [f"nprobe={n}" for n in (128, 256, 384, 512, 768)]),
    ("IVF1024,SQfp16", [f"nprobe={n}" for n in (64, 96, 128, 192)]),
    # Fast-scan 4-bit codes (SIMD lookup tables) for the scan, the shortlist
    # re-ranked from fp16 codes: the scan was the candidate service's largest cost.
    (
        "IVF4096,PQ32x4fs,Refine(SQfp16)",
        [
            "nprobe=256,k_factor=2",
            "nprobe=384,k_factor=2",
            "nprobe=384,k_factor=3",
            "nprobe=512,k_factor=3",
        ],
    ),  # fmt: skip
    (
        "IVF4096,PQ64x4fs,Refine(SQfp16)",
        ["nprobe=256,k_factor=2", "nprobe=384,k_factor=2", "nprobe=512,k_factor=2"],
    ),
]
"""With ``--artifacts``: settings for the learned space (64 dimensions by default):
full vectors, and fast-scan codes with a re-rank from fp16."""


TEXT_SHORT_PARAMS = [f"nprobe={n},k_factor=3" for n in (16, 32, 64, 128, 320)]
"""With ``--artifacts --space text``: the set's own text index (not rebuilt) at
these settings, for the text source's short list (``--k 100``)."""


def set_data(
    root: Path, n_queries: int, seed: int, space: str = "learned"
) -> tuple[np.ndarray, np.ndarray, str, tuple[str, Path] | None]:
    """(the set's item vectors of ``space``, a seeded sample of its stored user
    vectors there, its version, and for the text space (its factory, its index
    file)): the index the candidate service serves, on its own data."""
    from sieve import artifacts

    aset = artifacts.load(root)
    names = ("item_embeddings", "user_vectors")
    served = None
    if space == "text":
        names = ("text_embeddings", "text_user_vectors")
        if aset.manifest.text_index is None:
            raise SystemExit(f"{root}: set {aset.version} has no text index")
        served = (aset.manifest.text_index.factory, aset.verified("text_index"))
    emb = np.ascontiguousarray(np.load(aset.verified(names[0])), np.float32)
    with np.load(aset.verified(names[1])) as z:
        users = z["vectors"]
    pick = np.random.default_rng(seed).permutation(len(users))[:n_queries]
    return emb, np.ascontiguousarray(users[pick], np.float32), aset.version, served


def prefetch(path: Path, chunk: int = 16 << 20) -> None:
    """Read a file once so its pages are in the page cache: a memory-mapped index
    then serves its first queries without cold page faults."""
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass


def data(n: int, n_queries: int, seed: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [n, 384], queries [q, 384]) for the seeded catalog, cached."""
    path = cache / f"synthetic-{n}-seed{seed}.npz"
    if path.is_file():
        with np.load(path) as z:
            if len(z["queries"]) >= n_queries:
                return z["emb"], z["queries"][:n_queries]
    cat = synthetic_catalog(n, seed=seed)
    r = cat.ratings[cat.ratings["rating"] >= 4.0]
    queries = []
    for _, group in r.groupby("userId", sort=True):
        v = cat.embeddings[group["movieId"].to_numpy() - 1].mean(axis=0)
        queries.append(v / np.linalg.norm(v))
    q = np.asarray(queries, np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, emb=cat.embeddings, queries=q)
    return cat.embeddings, q[:n_queries]


def ground_truth(emb: np.ndarray, q: np.ndarray, k: int, cache: Path) -> np.ndarray:
    """Exact top-k inner-product scores [q, k] (IndexFlatIP), cached by content hash."""
    h = hashlib.sha256(q.tobytes())
    h.update(emb[:: max(1, len(emb) // 1000)].tobytes())
    path = cache / f"gt-{len(emb)}-{k}-{h.hexdigest()[:12]}.npy"
    if path.is_file():
        return np.load(path)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    # Batches of 64 x 384 stay below Faiss's BLAS threshold unless it is lowered.
    faiss.cvar.distance_compute_blas_threshold = 16
    scores = np.concatenate([index.search(q[lo : lo + 64], k)[0] for lo in range(0, len(q), 64)])
    np.save(path, scores)
    return scores


def recall(emb: np.ndarray, q: np.ndarray, ids: np.ndarray, kth: float) -> float:
    """Tie-tolerant recall@k of one result list of k slots: the share of slots
    holding an item whose exact score reaches the k-th exact score. Empty slots
    (-1, when an index finds fewer than k) count as misses."""
    k = len(ids)
    ids = ids[ids >= 0]
    exact = emb[ids] @ q
    return int((exact >= kth - 1e-5).sum()) / k if k else 0.0


def time_queries(index: faiss.Index, q: np.ndarray, k: int, params: Any, warmup: int = 20):  # type: ignore[no-untyped-def]
    """Per-query latencies in ms and result ids, one query at a time."""
    for i in range(warmup):
        index.search(q[i % len(q) : i % len(q) + 1], k, params=params)
    lat, out = [], []
    for i in range(len(q)):
        t0 = time.perf_counter()
        _, ids = index.search(q[i : i + 1], k, params=params)
        lat.append((time.perf_counter() - t0) * 1e3)
        out.append(ids[0])
    return np.asarray(lat), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--flat-queries", type=int, default=30)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=200_000)
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parent / ".cache"))
    ap.add_argument("--name", default="ann")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved passes per setting")
    ap.add_argument(
        "--mmap",
        action="store_true",
        help="memory-map the indexes (candidate.index_mmap = true); the default reads them "
        "into memory, as the candidate service does by default",
    )
    ap.add_argument("--artifacts", help="search a set's learned space instead (its vectors)")
    ap.add_argument(
        "--space",
        choices=("learned", "text"),
        default="learned",
        help="with --artifacts: the text space searches the set's own text index "
        "(TEXT_SHORT_PARAMS) with its stored text user vectors",
    )
    ap.add_argument(
        "--factories",
        help="only these factories of the sweep, separated by ';' (factories hold commas)",
    )
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    faiss.omp_set_num_threads(1)

    t0 = time.perf_counter()
    settings, tag = SETTINGS, f"seed{args.seed}"
    served = None
    if args.artifacts:
        emb, q, version, served = set_data(
            Path(args.artifacts), args.queries, args.seed, args.space
        )
        args.n, settings, tag = len(emb), LEARNED_SETTINGS, f"set-{version}-{args.space}"
        if served is not None:
            settings = [(served[0], TEXT_SHORT_PARAMS)]
    else:
        emb, q = data(args.n, args.queries, args.seed, cache)
    if args.factories:
        wanted = args.factories.split(";")
        settings = [(f, specs) for f, specs in settings if f in wanted]
    print(f"data: {emb.shape} items, {len(q)} queries ({time.perf_counter() - t0:.1f}s)")
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # ground truth and builds use all cores
    t0 = time.perf_counter()
    gt = ground_truth(emb, q, args.k, cache)
    kth = gt[:, -1]
    print(f"ground truth: {time.perf_counter() - t0:.1f}s")

    faiss.omp_set_num_threads(1)
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    faiss.cvar.distance_compute_blas_threshold = 128000  # the default: single queries
    nf = args.flat_queries
    rows: list[dict[str, Any]] = []
    builds: dict[str, Any] = {}
    indexes: dict[str, faiss.Index] = {}
    for factory, _ in settings:
        path = cache / f"index-{args.n}-{tag}-{factory.replace(',', '_')}.faiss"
        if served is not None:
            path = served[1]
        elif not path.is_file():
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            t0 = time.perf_counter()
            index = build_index(emb, factory, args.seed, args.train_size, progress=True)
            secs = time.perf_counter() - t0
            write_index(index, path)
            builds[factory] = {"build_s": secs}
            del index
        t0 = time.perf_counter()
        indexes[factory] = read_index(path, mmap=args.mmap)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if args.mmap:
            prefetch(path)  # into the page cache: no cold page faults on the clock
        builds.setdefault(factory, {}).update(
            load_s=load_s, prefetch_s=time.perf_counter() - t0, bytes=path.stat().st_size
        )
    faiss.omp_set_num_threads(1)
    # Every setting runs once per round, in a rotated order, and its latencies are
    # pooled over the rounds: a slow minute on this shared machine then lands on
    # every setting instead of on whichever was being measured.
    cells = [("Flat", "")] + [(f, spec) for f, specs in settings for spec in specs]
    lats: dict[tuple[str, str], list[np.ndarray]] = {c: [] for c in cells}
    found: dict[tuple[str, str], list[np.ndarray]] = {}
    for rnd in range(args.rounds):
        shift = rnd * len(cells) // args.rounds
        for factory, spec in cells[shift:] + cells[:shift]:
            if factory == "Flat":  # exact search, on the first queries: 70 ms each
                lat, ids = time_queries(flat, q[:nf], args.k, None, warmup=3)
            else:
                index = indexes[factory]
                params = search_parameters(index, parse_search_params(spec), args.k, None)
                lat, ids = time_queries(index, q, args.k, params)
            lats[(factory, spec)].append(lat)
            found[(factory, spec)] = ids
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    for factory, spec in cells:
        ids = found[(factory, spec)]
        r = float(np.mean([recall(emb, q[i], ids[i], kth[i]) for i in range(len(ids))]))
        row = {
            "factory": factory,
            "params": spec,
            "recall": r,
            **percentiles(np.concatenate(lats[(factory, spec)])),
            "queries": len(ids),
            "rounds": args.rounds,
        }
        rows.append(row)
        print(
            f"{factory:<32} {spec:<22} recall {r:.4f}  p50 {row['p50']:6.2f}  "
            f"p99 {row['p99']:6.2f} ms  {rows[0]['p50'] / row['p50']:5.1f}x Flat"
        )
    del indexes, flat
    flat_p50 = rows[0]["p50"]
    for row in rows:
        row["speedup_vs_flat_p50"] = flat_p50 / row["p50"]
    result = {
        "n": args.n,
        "data": f"the {args.space} space of {args.artifacts}" if args.artifacts else "synthetic",
        "dim": int(emb.shape[1]),
        "k": args.k,
        "queries": len(q),
        "threads": 1,
        "mmap": args.mmap,
        "rounds": args.rounds,
        "machine": {**machine(), "faiss": faiss.__version__},
        "builds": builds,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{args.name}.png")
    print(
        f"Flat: recall {rows[0]['recall']:.3f} p50 {rows[0]['p50']:.1f} p99 {rows[0]['p99']:.1f} ms"
    )
    for f, b in builds.items():
        print(f"build {f}: {json.dumps({k: round(v, 2) for k, v in b.items()})}")
    print(f"wrote {RESULTS / (args.name + '.json')} and .png")


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, pct in zip(axes, ("p50", "p99"), strict=True):
        for i, factory in enumerate(dict.fromkeys(r["factory"] for r in result["rows"])):
            rows = sorted(
                (r for r in result["rows"] if r["factory"] == factory), key=lambda r: r["recall"]
            )
            ax.plot(
                [r[pct] for r in rows],
                [r["recall"] for r in rows],
                "o-",
                color=f"C{i}",
                label=factory,
            )
            for r in rows:
                ax.annotate(
                    r["params"].replace("nprobe=", "np").replace(",k_factor=", " kf"),
                    (r[pct], r["recall"]),
                    fontsize=7,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{pct} latency per query, ms (1 thread, log)")
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.axhline(0.99, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"recall@{result['k']} vs exact")
    axes[0].legend(loc="lower right")
    fig.suptitle(f"{result['n']:,} x 384 synthetic, top-{result['k']}, {result['queries']} queries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
