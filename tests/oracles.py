"""Reference implementations the fast code is tested against: slow, obvious loops."""

from __future__ import annotations

import numpy as np


def naive_mmr(
    rel: np.ndarray, emb: np.ndarray, k: int, lam: float, penalty: str = "max"
) -> list[int]:
    """MMR as first written: a Python loop over items and over the picked ones
    (the oracle of the vectorised ``ranker.rerank.mmr``).

    Args:
        rel: [n] relevance of each item.
        emb: [n, d] L2-normalised embeddings (cosine = dot product).
        k: items to pick (at most n).
        lam: weight of relevance against the similarity penalty, in [0, 1].
        penalty: "max": the largest cosine to the picked (negatives as 0);
            "mean": their mean.

    Returns:
        Row indices into ``rel`` in pick order.
    """
    picked: list[int] = []
    for _ in range(min(k, len(rel))):
        best, best_value = -1, -np.inf
        for i in range(len(rel)):
            if i in picked:
                continue
            sims = [float(emb[i] @ emb[j]) for j in picked]
            if penalty == "max":
                sim = max([max(0.0, x) for x in sims], default=0.0)
            else:
                sim = float(np.mean(sims)) if sims else 0.0
            value = lam * rel[i] - (1 - lam) * sim
            if value > best_value:
                best, best_value = i, value
        picked.append(best)
    return picked
