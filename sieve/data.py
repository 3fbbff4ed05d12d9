"""MovieLens input: load the ``ml-latest-small`` CSV layout, split it, fetch it.

Also a seeded synthetic catalog in the same layout, the fallback when the real
data cannot be downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
REQUIRED_FILES = ("movies.csv", "ratings.csv")

# MovieLens' genre vocabulary, in a fixed order: the multi-hot encoding and the
# genre affinity vectors index into it.
GENRES: tuple[str, ...] = (
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "IMAX",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
    "(no genres listed)",
)
GENRE_INDEX = {g: i for i, g in enumerate(GENRES)}


@dataclass(frozen=True)
class MovieLens:
    """The three tables sieve reads. Ids are int64; timestamps are Unix seconds."""

    movies: pd.DataFrame  # movieId, title, genres ("A|B")
    ratings: pd.DataFrame  # userId, movieId, rating, timestamp
    tags: pd.DataFrame  # userId, movieId, tag, timestamp (may be empty)


class DataError(ValueError):
    """The input folder is not in the ``ml-latest-small`` layout."""


def load_movielens(data_dir: Path) -> MovieLens:
    """Read ``movies.csv``, ``ratings.csv`` and (optional) ``tags.csv``.

    pandas handles the CRLF line endings the GroupLens files keep.

    Raises:
        DataError: a required file or column is missing, naming it.
    """
    data_dir = Path(data_dir)
    for name in REQUIRED_FILES:
        if not (data_dir / name).is_file():
            raise DataError(f"{data_dir / name} is missing (expected the ml-latest-small layout)")
    movies = _read(data_dir / "movies.csv", ["movieId", "title", "genres"])
    ratings = _read(data_dir / "ratings.csv", ["userId", "movieId", "rating", "timestamp"])
    tags_path = data_dir / "tags.csv"
    tags = (
        _read(tags_path, ["userId", "movieId", "tag", "timestamp"])
        if tags_path.is_file()
        else pd.DataFrame({"userId": [], "movieId": [], "tag": [], "timestamp": []})
    )
    movies = movies.astype({"movieId": "int64", "title": "string", "genres": "string"})
    ratings = ratings.astype(
        {"userId": "int64", "movieId": "int64", "rating": "float32", "timestamp": "int64"}
    )
    # Ratings of items missing from the catalog cannot be served; drop them.
    ratings = ratings[ratings["movieId"].isin(movies["movieId"])].reset_index(drop=True)
    tags = tags.astype({"userId": "int64", "movieId": "int64", "tag": "string"})
    return MovieLens(movies=movies.reset_index(drop=True), ratings=ratings, tags=tags)


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    frame = pd.read_csv(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}")
    return frame[columns]


def temporal_split(
    ratings: pd.DataFrame, holdout_fraction: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out each user's latest ratings.

    For a user with n ratings, the latest ``max(1, round(n * holdout_fraction))``
    go to the holdout, but at least one rating always stays in training. Ties in
    time are broken by movieId so the split is deterministic.

    Returns:
        (train, holdout), disjoint, together equal to ``ratings``.
    """
    ordered = ratings.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    n = ordered.groupby("userId")["movieId"].transform("size").to_numpy()
    pos = ordered.groupby("userId").cumcount().to_numpy()
    n_hold = np.minimum(np.maximum(1, np.round(n * holdout_fraction)), n - 1)
    is_holdout = pos >= n - n_hold
    return (
        ordered[~is_holdout].reset_index(drop=True),
        ordered[is_holdout].reset_index(drop=True),
    )


def global_split(
    ratings: pd.DataFrame, holdout_fraction: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out every rating at or after one time T, the ``1 - holdout_fraction``
    quantile of the rating times: a model trained on the rest has seen nothing any
    user did after T, as a served request never sees the future.

    Returns:
        (train, holdout), disjoint, together equal to ``ratings``.
    """
    ordered = ratings.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    cut = float(np.quantile(ordered["timestamp"].to_numpy(np.float64), 1.0 - holdout_fraction))
    later = ordered["timestamp"].to_numpy(np.float64) >= cut
    return (
        ordered[~later].reset_index(drop=True),
        ordered[later].reset_index(drop=True),
    )


def split(
    ratings: pd.DataFrame, holdout_fraction: float, kind: str = "user"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``temporal_split`` (``kind="user"``) or ``global_split`` (``"global"``)."""
    if kind == "global":
        return global_split(ratings, holdout_fraction)
    if kind == "user":
        return temporal_split(ratings, holdout_fraction)
    raise ValueError(f"split is {kind!r}, not 'user' or 'global'")


def genre_multi_hot(genres: pd.Series) -> np.ndarray:
    """``"A|B"`` strings -> float32 [n, len(GENRES)]; unknown genres are ignored."""
    out = np.zeros((len(genres), len(GENRES)), dtype=np.float32)
    for row, value in enumerate(genres.fillna("")):
        for g in str(value).split("|"):
            j = GENRE_INDEX.get(g)
            if j is not None:
                out[row, j] = 1.0
    return out


def fetch_movielens(cache_dir: Path, url: str = GROUPLENS_URL, timeout_s: float = 20.0) -> Path:
    """Download and unpack ml-latest-small into ``cache_dir`` once; reuse after.

    The archive is unpacked into a temporary folder and moved into place with one
    rename, so an interrupted download never leaves a half-written data set.

    Returns:
        The folder holding ``movies.csv`` and ``ratings.csv``.

    Raises:
        OSError: the download or the unpacking failed (``urllib.error.URLError``
            is an ``OSError``).
        DataError: the archive does not hold the expected files.
    """
    target = Path(cache_dir) / "ml-latest-small"
    if all((target / f).is_file() for f in REQUIRED_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "ml.zip"
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(archive, "wb") as f:
            shutil.copyfileobj(resp, f)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(Path(tmp) / "x")
        found = [p.parent for p in (Path(tmp) / "x").rglob("ratings.csv")]
        if not found or not all((found[0] / f).is_file() for f in REQUIRED_FILES):
            raise DataError(f"{url} does not hold {', '.join(REQUIRED_FILES)}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(found[0], target)
    return target
