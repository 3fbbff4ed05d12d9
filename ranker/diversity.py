"""The space the diversity rules compare items in: the text embeddings on their
top principal directions, computed once when a set loads (and by the quality
report, so it re-ranks in the space serving uses)."""

from __future__ import annotations

import numpy as np


def compact_space(
    embeddings: np.ndarray, dims: int, sample: int = 20_000, seed: int = 0, chunk: int = 65_536
) -> np.ndarray:
    """``embeddings`` [n, d] on their top ``dims`` principal directions, rows
    L2-normalised, float32 [n, dims]: the space the diversity rules compare items
    in. MMR's cost is O(pool^2 d); at 32 of MiniLM's 384 dimensions its product is
    12x smaller, and the lists it picks keep their diversity measured in the full
    space (BENCHMARKS.md, "Where a Rank's CPU goes").

    The directions are those of the uncentred second moment (the right singular
    vectors of a seeded sample of ``sample`` rows), the ones that keep inner
    products best; rows of zeros stay zeros.
    """
    emb = np.asarray(embeddings)
    n, d = emb.shape
    if not 0 < dims < d:
        raise ValueError(f"dims must be in 1..{d - 1}, got {dims}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    _, _, vt = np.linalg.svd(np.asarray(emb[rows], np.float64), full_matrices=False)
    basis = np.ascontiguousarray(vt[:dims].T, np.float32)
    out = np.empty((n, dims), np.float32)
    for start in range(0, n, chunk):
        part = np.asarray(emb[start : start + chunk], np.float32) @ basis
        part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        out[start : start + chunk] = part
    return out
