"""Feature logging and the skew check on the session's MovieLens set: the rows a
Rank scored are logged exactly (one per candidate, the model's columns), and the
training code, given the same user and candidates, computes the same item
features (a difference there is a bug); the user-vector features may differ by
design (request-time tower), and the report says how much."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from app.skew import skew_report
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.feature_log import FeatureLogConfig, read_feature_log
from ranker.features import ITEM
from tests.conftest import RELAXED, STATELESS

USERS = (1, 42, 414, 7, 90)


async def test_logged_rows_and_their_skew(  # type: ignore[no-untyped-def]
    servers, artifacts_root: Path, tmp_path: Path
) -> None:
    from ranker.service import create_server

    log_dir = tmp_path / "features"
    cfg = RankerConfig(port=0, item_refresh_s=0, candidate_address=servers["candidate"],
                       reliability=RELAXED, rerank=STATELESS,
                       feature_log=FeatureLogConfig(sample=1.0, dir=str(log_dir)))  # fmt: skip
    server, pipeline = await create_server(cfg, artifacts_root)
    features = list(pipeline.sets.live.scorer.features)  # type: ignore[union-attr]
    answers = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = sieve_pb2_grpc.RankerServiceStub(ch)
            for user in USERS:
                answers[user] = await stub.Rank(sieve_pb2.RankRequest(user_id=user), timeout=30)
    finally:
        await server.stop(0)  # closes the pipeline: the writer flushes
    logged = read_feature_log(log_dir)
    assert set(logged["request_id"]) == {a.request_id for a in answers.values()}
    assert all(not a.rungs for a in answers.values())
    for user, answer in answers.items():
        mine = logged[logged["request_id"] == answer.request_id]
        assert (mine["user_id"] == user).all() and (
            mine["version"] == answer.artifact_version
        ).all()
        # the returned items are among the scored rows
        assert {i.item_id for i in answer.items} <= set(mine["item_id"])
        assert mine["item_id"].is_unique and len(mine) >= 50
    assert [c for c in logged.columns if c.startswith("f_")] == [f"f_{n}" for n in features]
    report = skew_report(log_dir, artifacts_root)
    (ver,) = report["versions"].values()
    assert ver["requests"] == len(USERS) and ver["rows"] == len(logged)
    feats = ver["features"]
    assert set(feats) == set(features)
    # item features: the online store holds what the tables hold
    for name in (f for f in feats if f in ITEM):
        assert feats[name]["share_differing"] == 0.0, (name, feats[name])
    assert all(np.isfinite(v["mean_abs_diff"]) for v in feats.values())
