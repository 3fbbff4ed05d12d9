"""``sieve skew``: training-serving skew, per feature, from the feature log.

For every logged Rank (``ranker/feature_log.py``) the training code's funnel
(``app.quality.offline_funnel``, the code that computes the training rows)
computes the model rows of the same user and the same candidates (their sources,
learned ranks and item-to-item scores as served) from the set's offline tables;
then, feature by feature, the served value is compared with it: the share of
rows that differ (beyond ``tol``, relative), the mean and largest absolute
difference, and both means.

Some skew is by design, and the report says where it comes from: the served
learned score uses the request-time user vector (the user tower over the user's
latest items, events included) where the offline rows use the stored vector;
features read from the online store differ from the tables when they were
materialized at another time or changed by events. An item feature that differs
is a bug.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from app.quality import offline_funnel
from ranker.feature_log import read_feature_log
from ranker.sources import Candidates
from sieve import artifacts


def skew_report(log_dir: Path, root: Path, tol: float = 1e-4) -> dict[str, Any]:
    """The skew of every logged feature, per artifact version of the log."""
    logged = read_feature_log(log_dir)
    report: dict[str, Any] = {"rows": int(len(logged)), "versions": {}}
    for version, part in logged.groupby("version", sort=True):
        aset = artifacts.load(root, str(version))
        funnel, users, _ = offline_funnel(aset)
        names = [c[2:] for c in part.columns if c.startswith("f_")]
        if names != list(aset.manifest.model.features):
            raise ValueError(f"{version}: the log's features are not the set's model's")
        served, offline = [], []
        unknown_users = 0
        for _, rows in part.groupby("request_id", sort=False):
            user_id = int(rows["user_id"].iloc[0])
            if user_id not in users.index:
                unknown_users += 1  # no offline row: nothing to compare with
                continue
            cand = Candidates(
                rows["item_id"].to_numpy(np.int64),
                rows["sources"].to_numpy(np.uint8),
                rows["learned_rank"].to_numpy(np.int32),
                rows["i2i"].to_numpy(np.float32),
            )
            offline.append(funnel.inputs(users.loc[user_id], cand))
            served.append(rows[[f"f_{n}" for n in names]].to_numpy(np.float32))
        a, b = np.concatenate(served), np.concatenate(offline).astype(np.float32)
        per: dict[str, Any] = {}
        for j, name in enumerate(names):
            s, o = a[:, j], b[:, j]
            finite = np.isfinite(o)
            diff = np.abs(s[finite] - o[finite])
            differs = diff > tol * np.maximum(1.0, np.abs(o[finite]))
            per[name] = {
                "share_differing": float(differs.mean()) if len(diff) else 0.0,
                "mean_abs_diff": float(diff.mean()) if len(diff) else 0.0,
                "max_abs_diff": float(diff.max()) if len(diff) else 0.0,
                "served_mean": float(s.mean()),
                "offline_mean": float(o[finite].mean()) if finite.any() else float("nan"),
                "offline_nonfinite": int((~finite).sum()),
            }
        report["versions"][str(version)] = {
            "requests": int(part["request_id"].nunique()),
            "rows": int(len(a)),
            "unknown_users": unknown_users,
            "features": dict(sorted(per.items(), key=lambda kv: -kv[1]["share_differing"])),
        }
    return report
