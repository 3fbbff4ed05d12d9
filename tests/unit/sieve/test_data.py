from __future__ import annotations

import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.cli import resolve_data
from sieve.data import (
    GENRES,
    DataError,
    fetch_movielens,
    genre_multi_hot,
    load_movielens,
    split,
    temporal_split,
)


def test_temporal_split_holds_out_each_users_latest() -> None:
    ratings = pd.DataFrame(
        {
            "userId": [1] * 10 + [2] * 2 + [3],
            "movieId": list(range(10)) + [5, 6] + [7],
            "rating": np.ones(13, np.float32),
            "timestamp": list(range(100, 110)) + [50, 40] + [1],
        }
    )
    train, hold = temporal_split(ratings, 0.2)
    assert sorted(hold[hold.userId == 1].movieId) == [8, 9]
    # user 2: the later rating (movie 5 at t=50) is held out, one stays for training
    assert list(hold[hold.userId == 2].movieId) == [5]
    assert list(train[train.userId == 2].movieId) == [6]
    # a user with one rating keeps it for training
    assert 3 not in set(hold.userId) and 3 in set(train.userId)
    assert len(train) + len(hold) == len(ratings)


def test_temporal_split_on_movielens(movielens_dir: Path) -> None:
    ml = load_movielens(movielens_dir)
    train, hold = temporal_split(ml.ratings, 0.2)
    assert len(train) + len(hold) == len(ml.ratings)
    assert set(train.userId) == set(ml.ratings.userId)
    last_train = train.groupby("userId").timestamp.max()
    first_hold = hold.groupby("userId").timestamp.min()
    assert (last_train.loc[first_hold.index] <= first_hold).all()
    pairs = set(zip(train.userId, train.movieId, strict=True))
    assert not pairs & set(zip(hold.userId, hold.movieId, strict=True))


def test_global_split_holds_out_everything_after_one_time(movielens_dir: Path) -> None:
    ml = load_movielens(movielens_dir)
    train, hold = split(ml.ratings, 0.2, "global")
    assert len(train) + len(hold) == len(ml.ratings)
    assert train.timestamp.max() < hold.timestamp.min()  # nothing after T in training
    assert abs(len(hold) / len(ml.ratings) - 0.2) < 0.01
    # users whose ratings all come after T have no training part: the report skips them
    assert set(hold.userId) - set(train.userId)
    with pytest.raises(ValueError, match="not 'user' or 'global'"):
        split(ml.ratings, 0.2, "random")


def test_genre_multi_hot() -> None:
    out = genre_multi_hot(pd.Series(["Action|Drama", "(no genres listed)", "Nonsense"]))
    assert out.shape == (3, len(GENRES))
    assert out[0, GENRES.index("Action")] == 1 and out[0, GENRES.index("Drama")] == 1
    assert out[0].sum() == 2 and out[1].sum() == 1 and out[2].sum() == 0


def test_load_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ratings.csv"):
        (tmp_path / "movies.csv").write_text("movieId,title,genres\n")
        load_movielens(tmp_path)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server over a folder (the download code's GroupLens stand-in)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    thread.join()


def test_fetch_downloads_unpacks_and_caches(http_root, movielens_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, root = http_root
    with zipfile.ZipFile(root / "ml-latest-small.zip", "w") as zf:
        for name in ("movies.csv", "ratings.csv", "tags.csv"):
            zf.write(movielens_dir / name, f"ml-latest-small/{name}")
    cache = tmp_path / "cache"
    got = fetch_movielens(cache, f"{base}/ml-latest-small.zip")
    assert (got / "ratings.csv").read_bytes() == (movielens_dir / "ratings.csv").read_bytes()
    # cached: a second call does not need the server
    (root / "ml-latest-small.zip").unlink()
    assert fetch_movielens(cache, f"{base}/ml-latest-small.zip") == got
    assert load_movielens(got).movies.shape[0] == 9742


def test_fetch_refuses_an_archive_without_the_data(http_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, root = http_root
    with zipfile.ZipFile(root / "bad.zip", "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with pytest.raises(DataError, match="ratings.csv"):
        fetch_movielens(tmp_path / "cache", f"{base}/bad.zip")
    assert not (tmp_path / "cache" / "ml-latest-small").exists()


def test_failed_download_falls_back_to_synthetic_in_one_line(http_root, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    base, _ = http_root
    got = resolve_data(None, tmp_path / "cache", f"{base}/missing.zip")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "synthetic" in out[0] and "404" in out[0]
    assert got is None  # quickstart then builds the seeded synthetic catalog
    assert resolve_data("some/dir", tmp_path, f"{base}/missing.zip") == Path("some/dir")
