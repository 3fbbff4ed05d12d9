"""Start-up, shutdown, refused artifacts, reloads and the quickstart, for real."""

from __future__ import annotations

import json
import shutil
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from candidate.config import CandidateConfig
from candidate.embed import MODEL_ID, embed_texts
from candidate.service import create_server as create_candidate
from features.materialize import apply_and_materialize, write_offline
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.features import MODEL_FEATURES
from ranker.pipeline import RankPipeline
from ranker.service import create_server as create_ranker
from ranker.train import ONNX_TOLERANCE
from sieve import artifacts
from sieve.errors import ArtifactError
from sieve.grpc_server import Server
from sieve.local_redis import free_port
from tests.conftest import EMBED_CACHE, RELAXED, copy_artifacts, sieve_process


def rematerialize_items(repo: Path, items: pd.DataFrame, event_time: datetime) -> None:
    """Write a changed item table into the repo and materialize it as of ``event_time``
    (a later materialization job, as production would run it)."""
    users = pd.read_parquet(repo / "data" / "user_features.parquet")
    tables = {"item_features": items.drop(columns="event_timestamp"), "user_features": users}
    write_offline(repo / "data", tables, event_time)
    apply_and_materialize(repo, event_time)


def test_manifest_names_what_belongs_together(artifact_set: artifacts.ArtifactSet) -> None:
    m = artifact_set.manifest
    for role in m.files:
        artifact_set.verified(role)  # every file present and matching its checksum
    # the build checks each ONNX file against torch on 512 real training rows and
    # 512 random ones, and INT8 against FP32 on the same rows
    diffs = m.model.onnx_max_abs_diff
    assert diffs["teacher"] < ONNX_TOLERANCE and diffs["student"] < ONNX_TOLERANCE
    assert 0 < diffs["student_int8_vs_fp32"] < 0.05
    assert {"model", "model_int8", "teacher"} <= set(m.files)
    assert m.model.features == MODEL_FEATURES
    # held-out users of the training rows: the models learned something
    assert all(v > 0.75 for v in m.model.val_auc.values()), m.model.val_auc
    # the learned space (the main index) and the text space, both exact at 9.7k items
    assert m.index.ntotal == 9742 and m.index.dim == 64
    assert m.text_index is not None and (m.text_index.ntotal, m.text_index.dim) == (9742, 384)
    assert m.feature_schema.feature_service == "ranker_v3"
    assert m.index.factory == "Flat" and m.index.search_params == ""  # auto, 9.7k items
    assert m.feature_schema.views["user_features"].features["user_vector"].dim == 64
    assert "faiss indexes: learned (Flat), text (Flat)" in m.build.stage_seconds
    # the towers' export check and their validation figures (the validation split)
    r = m.retriever
    assert r is not None and r.dim == 64 and r.onnx_max_abs_diff < 1e-4
    assert 0.5 < r.validation["recall_learned"] < r.validation["recall_funnel"] <= 1.0
    assert m.model.sources == {"learned": 1200, "text": 100, "i2i": 100, "popular": 100}
    stats = m.build.stats
    assert stats["train"] + stats["holdout"] == stats["ratings"] == 100_836


async def test_health_is_not_serving_until_ready() -> None:
    server = Server("sieve.v1.Test", "127.0.0.1", 0)
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        check = health_pb2.HealthCheckRequest(service="sieve.v1.Test")
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await server.ready()
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
    await server.stop(0)


async def test_corrupt_index_is_refused_naming_the_file(
    artifacts_root: Path, tmp_path: Path
) -> None:
    root = copy_artifacts(artifacts_root, tmp_path)
    aset = artifacts.load(root)
    aset.path("index").write_bytes(b"\x00" * 100)
    with pytest.raises(
        ArtifactError, match=r"index file .*index.faiss does not match its checksum"
    ):
        await create_candidate(CandidateConfig(port=0), root)
    # Even with a manifest that agrees, the bytes are refused by Faiss, naming the file.
    files = {**aset.manifest.files, "index": artifacts.file_entry(aset.root, "index.faiss")}
    artifacts.write_manifest(aset.root, aset.manifest.model_copy(update={"files": files}))
    with pytest.raises(
        ArtifactError, match=r"index file .*index.faiss is not a readable Faiss index"
    ):
        await create_candidate(CandidateConfig(port=0), root)


async def test_corrupt_model_is_refused_naming_the_file(
    artifacts_root: Path, tmp_path: Path
) -> None:
    root = copy_artifacts(artifacts_root, tmp_path)
    artifacts.load(root).path("model").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match=r"model file .*ranker.onnx does not match"):
        await create_ranker(RankerConfig(port=0, item_refresh_s=0), root)


def test_serve_refuses_to_start_without_artifacts(tmp_path: Path) -> None:
    proc = sieve_process(
        "serve", "--artifacts", str(tmp_path), "--candidate-port", "0", "--ranker-port", "0"
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert f"{tmp_path}/CURRENT is missing" in out


def test_serve_answers_then_stops_gracefully_on_sigterm(
    artifacts_root: Path, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    rport = free_port()
    proc = sieve_process(
        "serve",
        "--artifacts",
        str(artifacts_root),
        "--candidate-port",
        "0",
        "--ranker-port",
        str(rport),
        "--ready-file",
        str(ready),
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():  # the server writes this file once both are SERVING
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "sieve serve not ready in 120 s"
            time.sleep(0.1)
        with grpc.insecure_channel(f"127.0.0.1:{rport}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            resp = sieve_pb2_grpc.RankerServiceStub(ch).Rank(sieve_pb2.RankRequest(user_id=42))
            assert len(resp.items) == 50 and not resp.degradations
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "shutting down" in out


async def test_item_features_reload_after_a_new_materialization(
    artifacts_root: Path, tmp_path: Path
) -> None:
    root = copy_artifacts(artifacts_root, tmp_path)
    aset = artifacts.load(root)
    repo = aset.path("feature_store").parent
    # The copied registry still names the original parquet paths: re-apply here.
    items = pd.read_parquet(repo / "data" / "item_features.parquet")
    event_time = items["event_timestamp"].iloc[0].to_pydatetime()
    apply_and_materialize(repo, event_time)

    pipeline = RankPipeline(RankerConfig(port=0, item_refresh_s=0), root)
    await pipeline.start()
    try:
        assert not await pipeline.refresh_item_features()  # nothing new yet
        target = int(items["item_id"].iloc[5])
        rows, _ = pipeline.sets.live.items.rows(np.array([target]))  # type: ignore[union-attr]
        before = float(pipeline.sets.live.items.columns["rating_mean"][rows[0]])  # type: ignore[union-attr]
        items.loc[5, "rating_mean"] = np.float32(before + 0.75)
        later = event_time + timedelta(hours=1)
        rematerialize_items(repo, items, later)
        assert await pipeline.refresh_item_features()
        rows, _ = pipeline.sets.live.items.rows(np.array([target]))  # type: ignore[union-attr]
        after = float(pipeline.sets.live.items.columns["rating_mean"][rows[0]])  # type: ignore[union-attr]
        assert after == pytest.approx(before + 0.75)
    finally:
        await pipeline.close()


def test_embedding_cache_skips_unchanged_items(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from candidate.embed import item_texts
    from sieve.data import load_movielens

    ml = load_movielens(
        Path(json.loads((built.root / "manifest.json").read_text())["source"]["data_dir"])
    )
    texts = item_texts(ml.movies.head(50), ml.tags, top_tags=3)
    cache = tmp_path / f"embeddings-{MODEL_ID}.npz"  # a copy: the session's cache stays as built
    shutil.copy(EMBED_CACHE / cache.name, cache)
    first, n_new = embed_texts(texts, cache, show_progress=False)
    assert n_new == 0  # all 50 were embedded by the session's build
    changed = [*texts[:-1], texts[-1] + " A changed description."]
    again, n_new = embed_texts(changed, cache, show_progress=False)
    assert n_new == 1
    np.testing.assert_array_equal(again[:-1], first[:-1])
    assert abs(float(np.linalg.norm(again[-1])) - 1.0) < 1e-5
    assert not np.array_equal(again[-1], first[-1])


def test_quickstart_end_to_end(movielens_dir: Path, tmp_path: Path) -> None:
    """What `make demo` runs: build, serve, rank three users, print the tables."""
    cache = tmp_path / "cache"
    cache.mkdir()
    src = EMBED_CACHE / f"embeddings-{MODEL_ID}.npz"
    shutil.copy(src, cache / src.name)  # the session's build already embedded these texts
    proc = sieve_process(
        "quickstart",
        "--data",
        str(movielens_dir),
        "--out",
        str(tmp_path / "art"),
        "--cache",
        str(cache),
        "--users",
        "1,42",
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    for user in (1, 42):
        block = out.split(f"user {user}: ")[1]
        assert block.startswith("50 items")
        table = block.split("stage times")[0].strip().splitlines()[2:]
        assert len(table) == 50
    assert "stage times (ms): validate" in out and "degradations: none" in out
    assert "Batches:" not in out  # the progress bar shows only when texts are embedded


async def test_nonfinite_item_features_are_scored_with_defaults(
    artifacts_root: Path, servers, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A bad materialization (NaN rating means) degrades the answer, never the scores."""
    root = copy_artifacts(artifacts_root, tmp_path)
    repo = artifacts.load(root).path("feature_store").parent
    items = pd.read_parquet(repo / "data" / "item_features.parquet")
    event_time = items["event_timestamp"].iloc[0].to_pydatetime() + timedelta(hours=1)
    # Feast stores NaN as a null value (read back as NaN), infinity as it is
    items["rating_mean"] = np.where(
        np.arange(len(items)) % 2, np.float32(np.nan), np.float32(np.inf)
    )
    rematerialize_items(repo, items, event_time)
    cfg = RankerConfig(
        port=0, item_refresh_s=0, candidate_address=servers["candidate"], reliability=RELAXED
    )
    pipeline = RankPipeline(cfg, root)
    await pipeline.start()
    try:
        from ranker.context import RankQuery

        result = await pipeline.rank(RankQuery(42, 50, np.empty(0, np.int64), False))
    finally:
        await pipeline.close()
    assert len(result.item_ids) == 50 and np.isfinite(result.model_scores).all()
    bad = [d for d in result.degradations if d.startswith("nonfinite_features")]
    assert bad and pipeline.nonfinite_feature_values >= 1000 * 2  # rating_mean and rating_gap
