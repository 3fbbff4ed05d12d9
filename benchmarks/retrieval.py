"""The candidate funnel tuned on the validation split: source quotas, item-to-item
windows and two-tower settings, scored by the share of the later positives that
reach the candidates. The holdout is never read: the data's ratings are split as
``sieve build`` splits them, and only the training part is split again (earlier
part trains, later part validates), as the build's validation split is.

    python -m benchmarks.retrieval --data ../shared/data/movielens/ml-latest-small

Writes ``benchmarks/results/retrieval.json`` and ``retrieval.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.harness import RESULTS, pyplot

QUOTAS = {
    "learned": (400, 600, 800, 1000, 1200),
    "text": (0, 100, 200),
    "i2i": (0, 100, 200, 400),
    "popular": (0, 100),
}
TOWER_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "temperature=0.1": {"temperature": 0.1},
    "hidden=512": {"hidden": 512},
    "dim=128": {"dim": 128},
    "dim=32": {"dim": 32},
    "epochs=20": {"epochs": 20},
    "positive ratings as targets": {"target_rating": 4.0},
}


def main() -> None:
    from app.baselines import fit_ease, interactions, top_unseen
    from app.config import BuildConfig
    from candidate.embed import MODEL_ID, embed_texts, item_texts
    from candidate.neighbours import cooccurrence_neighbours
    from candidate.towers import TowerSpec, train_towers
    from features.tables import user_table
    from ranker.sources import i2i_scores, merge
    from sieve.data import genre_multi_hot, load_movielens, split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="user", choices=["user", "global"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/sieve-quality/cache")
    ap.add_argument("--variants", default=",".join(TOWER_VARIANTS))
    args = ap.parse_args()
    cfg = BuildConfig(seed=args.seed, split=args.split)
    ml = load_movielens(Path(args.data))
    train, _ = split(ml.ratings, cfg.holdout_fraction, cfg.split)
    early, late = split(train, cfg.label_fraction, cfg.split)
    ids = ml.movies["movieId"].to_numpy(np.int64)
    emb, _ = embed_texts(
        item_texts(ml.movies, ml.tags, cfg.top_tags),
        Path(args.cache) / f"embeddings-{MODEL_ID}.npz",
        cfg.embedding_batch_size,
    )
    emb = np.ascontiguousarray(emb, np.float32)
    genres = genre_multi_hot(ml.movies["genres"])
    positive = cfg.positive_rating
    liked = late[late["rating"] >= positive].groupby("userId")["movieId"].apply(set)
    users = user_table(early, ml.movies, emb, positive).set_index("user_id")
    users = users.loc[[u for u in liked.index if u in users.index]]
    row = pd.Series(np.arange(len(ids)), index=ids)
    seen = {u: np.sort(np.asarray(users.loc[u, "seen_item_ids"])) for u in users.index}
    count = early.groupby("movieId").size().reindex(ids, fill_value=0).to_numpy()
    popular = ids[np.argsort(-count, kind="stable")]
    out: dict[str, Any] = {"split": args.split, "seed": args.seed, "users": len(users)}

    def top(scores: np.ndarray, u: int, k: int) -> np.ndarray:
        s = scores.copy()
        s[row.loc[seen[u]].to_numpy()] = -np.inf
        best = np.argpartition(-s, k)[:k]
        return ids[best[np.argsort(-s[best], kind="stable")]]

    def recall(lists: dict[int, np.ndarray]) -> float:
        return float(
            np.mean([len(liked[u] & set(lists[u].tolist())) / len(liked[u]) for u in lists])
        )

    text_lists = {u: top(emb @ users.loc[u, "text_vector"], u, 2048) for u in users.index}
    base = TowerSpec(**cfg.retriever.model_dump(), seed=args.seed)
    learned_of: dict[str, dict[int, np.ndarray]] = {}
    out["towers"] = {}
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        towers = train_towers(early, ids, emb, genres, replace(base, **TOWER_VARIANTS[name]))
        at = pd.Series(np.arange(len(towers.user_ids)), index=towers.user_ids)
        lists = {
            u: top(towers.item_vectors @ towers.user_vectors[at[u]], u, 2048) for u in users.index
        }
        learned_of[name] = lists
        out["towers"][name] = {
            f"recall@{k}": round(recall({u: v[:k] for u, v in lists.items()}), 4)
            for k in (100, 400, 800, 1200)
        } | {"seconds": round(time.perf_counter() - t0, 1)}
        print(f"[retrieval] towers {name}: {out['towers'][name]}", flush=True)
    out["text"] = {
        f"recall@{k}": round(recall({u: v[:k] for u, v in text_lists.items()}), 4)
        for k in (100, 200, 800)
    }
    ease = fit_ease(interactions(early, ids).matrix, 300.0)
    ease_lists = top_unseen(ease, interactions(early, ids), list(users.index), ids, 1400)
    out["ease_lambda_300"] = {
        f"recall@{k}": round(recall({u: v[:k] for u, v in ease_lists.items()}), 4)
        for k in (100, 400, 800, 1200, 1400)
    }
    print(f"[retrieval] text {out['text']}  ease {out['ease_lambda_300']}", flush=True)
    recent = {
        u: row.loc[np.asarray(users.loc[u, "recent_item_ids"])].to_numpy() for u in users.index
    }
    i2i_of = {}
    out["i2i"] = {}
    for window in (5, 10, 50):
        nb = cooccurrence_neighbours(early, ids, window, cfg.neighbours_top)
        i2i_of[window] = {u: i2i_scores(nb[0], nb[1], recent[u], ids) for u in users.index}
        lists = {u: v[0][np.argsort(-v[1], kind="stable")][:400] for u, v in i2i_of[window].items()}
        lists = {u: v[~np.isin(v, seen[u])][:200] for u, v in lists.items()}
        out["i2i"][f"window={window}"] = {"recall@200": round(recall(lists), 4)}
    print(f"[retrieval] i2i {out['i2i']}", flush=True)
    grid = []
    best_tower = max(out["towers"], key=lambda n: out["towers"][n]["recall@800"])
    for window in i2i_of:
        for values in itertools.product(*QUOTAS.values()):
            quotas = dict(zip(QUOTAS, values, strict=True))
            sizes, found = [], []
            for u in users.index:
                c = merge(
                    learned_of[best_tower][u],
                    text_lists[u],
                    i2i_of[window][u],
                    popular,
                    seen[u],
                    quotas,
                )
                sizes.append(len(c.ids))
                found.append(len(liked[u] & set(c.ids.tolist())) / len(liked[u]))
            grid.append(
                {
                    "window": window,
                    **quotas,
                    "size": round(float(np.mean(sizes)), 1),
                    "recall": round(float(np.mean(found)), 4),
                }  # fmt: skip
            )
    out["tower_for_grid"] = best_tower
    out["grid"] = grid
    for size in (800, 1000, 1300, 1600):
        fit = [g for g in grid if g["size"] <= size]
        if fit:
            best = max(fit, key=lambda g: g["recall"])
            print(f"[retrieval] best at <= {size} candidates: {best}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrieval.json").write_text(json.dumps(out, indent=2) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for window in i2i_of:
        pts = [(g["size"], g["recall"]) for g in grid if g["window"] == window]
        ax.scatter(*zip(*pts, strict=True), s=8, alpha=0.6, label=f"sources, i2i window {window}")
    ks = (100, 400, 800, 1200, 1400)
    ax.plot(ks, [out["ease_lambda_300"][f"recall@{k}"] for k in ks], "k--", label="EASE top n")
    ax.set_xlabel("candidates per user (mean)")
    ax.set_ylabel("validation recall of later positives")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "retrieval.png", dpi=110)


if __name__ == "__main__":
    main()
