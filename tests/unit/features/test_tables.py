from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from features.definitions import HISTORY_YEARS, ITEM_VIEW, USER_VIEW
from features.tables import SECONDS_PER_YEAR, item_table, user_table

CUTOFF = 2_000_000_000
YEAR = SECONDS_PER_YEAR


def _ratings() -> pd.DataFrame:
    rows = [
        # user, movie, rating, seconds before the cut-off
        (1, 10, 4.0, 0),  # the cut-off itself: year 0
        (1, 20, 3.0, 0.5 * YEAR),  # year 0
        (2, 10, 5.0, 1.5 * YEAR),  # year 1
        (2, 10, 2.0, 2.2 * YEAR),  # year 2
        (3, 20, 4.0, 40 * YEAR),  # older than the history: its last bin
    ]
    return pd.DataFrame(
        {
            "userId": [r[0] for r in rows],
            "movieId": [r[1] for r in rows],
            "rating": [r[2] for r in rows],
            "timestamp": [int(CUTOFF - r[3]) for r in rows],
        }
    )


def _movies() -> pd.DataFrame:
    return pd.DataFrame(
        {"movieId": [10, 20, 30], "title": ["a", "b", "c"], "genres": ["Drama", "Comedy", "War"]}
    )


def test_rating_history_counts_each_items_ratings_by_year_before_the_cutoff() -> None:
    items = item_table(_movies(), _ratings())
    assert set(f.name for f in ITEM_VIEW.features) <= set(items.columns)
    history = np.stack(items["rating_history"].to_list())
    assert history.shape == (3, HISTORY_YEARS) and history.dtype == np.float32
    expected = np.zeros((3, HISTORY_YEARS), np.float32)
    expected[0, [0, 1, 2]] = 1  # movie 10
    expected[1, [0, HISTORY_YEARS - 1]] = 1  # movie 20
    np.testing.assert_array_equal(history, expected)  # movie 30: never rated
    np.testing.assert_array_equal(history.sum(axis=1), np.expm1(items["log_popularity"]).round())


def test_idle_years_is_the_time_from_the_users_last_rating_to_the_cutoff() -> None:
    users = user_table(_ratings(), _movies(), np.eye(3, dtype=np.float32), 4.0)
    assert set(f.name for f in USER_VIEW.features) <= set(users.columns)
    idle = users.set_index("user_id")["idle_years"]
    np.testing.assert_allclose(idle.loc[[1, 2, 3]].to_numpy(), [0.0, 1.5, 40.0], rtol=1e-6)


def test_a_frame_handed_over_in_files_comes_back_equal(tmp_path: Path) -> None:
    from features.item_table import load_frame, save_frame
    from features.reader import FeatureFrame

    lists = [np.array([3, 1], np.int64), np.empty(0, np.int64), np.array([7], np.int64)]
    frame = FeatureFrame(
        ids=np.array([10, 11, 12], np.int64),
        found=np.array([True, False, True]),
        columns={
            "vec": np.arange(6, dtype=np.float32).reshape(3, 2),
            "n": np.array([1, 0, 2], np.int64),
            "seen": lists,
        },
    )
    save_frame(frame, tmp_path)
    back = load_frame(tmp_path)
    np.testing.assert_array_equal(back.ids, frame.ids)
    np.testing.assert_array_equal(back.found, frame.found)
    assert list(back.columns) == ["vec", "n", "seen"]
    assert back.array("vec").dtype == np.float32 and back.array("n").dtype == np.int64
    np.testing.assert_array_equal(back.array("vec"), frame.array("vec"))
    assert [a.tolist() for a in back.lists("seen")] == [[3, 1], [], [7]]
