"""``sieve build``: the offline jobs, in order, into one versioned artifact set.

catalog + ratings -> time split (and the validation split carved from training)
-> item text embeddings -> two towers (on the earlier part, then on all training;
user tower to ONNX) -> co-occurrence neighbours -> feature tables and user
vectors -> Faiss indexes (learned, text) -> ranker training rows from every
candidate source -> ranking model (ONNX, checked against torch) -> Feast apply +
materialize -> manifest.json -> CURRENT.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.config import BuildConfig
from sieve import artifacts
from sieve.data import GENRES, MovieLens, genre_multi_hot, load_movielens, split
from sieve.manifest import (
    BuildSection,
    FeatureSchemaSection,
    FeatureSpecSection,
    IndexSection,
    Manifest,
    ModelSection,
    RetrieverSection,
    TeacherSection,
    ViewSection,
)
from sieve.synthetic import synthetic_catalog

log = logging.getLogger(__name__)


@dataclass
class BuildReport:
    version: str
    root: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        print(f"[build] {name} ...", flush=True)
        yield
        self.stage_seconds[name] = round(time.perf_counter() - t0, 3)
        print(f"[build] {name} done in {self.stage_seconds[name]:.1f}s", flush=True)


def _version(data_dir: Path | None, synthetic: int, config: BuildConfig, now: datetime) -> str:
    h = hashlib.sha256(config.model_dump_json().encode())
    h.update(f"synthetic={synthetic}".encode())
    for name in ("movies.csv", "ratings.csv", "tags.csv"):
        if data_dir is not None and (data_dir / name).is_file():
            h.update(artifacts.sha256_file(data_dir / name).encode())
    return f"{now:%Y%m%d%H%M%S}_{h.hexdigest()[:8]}"


def with_event_ratings(ml: MovieLens, events_dir: Path) -> tuple[MovieLens, dict[str, Any]]:
    """``ml`` with the event log's ratings in its ratings, and what was taken."""
    from features.event_log import merge_ratings, read_event_log

    ratings, stats = merge_ratings(ml.ratings, read_event_log(events_dir), ml.movies["movieId"])
    info: dict[str, Any] = {"dir": str(events_dir.resolve()), **stats}
    return MovieLens(movies=ml.movies, ratings=ratings, tags=ml.tags), info


def _retrieval(index: Any, item_ids: np.ndarray, params: dict[str, int]) -> Any:
    """A Faiss index over the catalog, searched as the candidate service searches
    it (no stored user vectors)."""
    from candidate.index import CandidateIndex

    return CandidateIndex(
        index, item_ids, np.empty(0, np.int64), np.empty((0, index.d), np.float32), params
    )


def build(
    data_dir: Path | None,
    out: Path,
    config: BuildConfig,
    cache_dir: Path | None = None,
    synthetic: int = 0,
    events_dir: Path | None = None,
) -> BuildReport:
    """Run every offline job and publish the artifact set.

    The input is MovieLens-layout CSVs in ``data_dir``, or, with ``synthetic=N``,
    a seeded synthetic catalog of N items whose embeddings are generated directly
    (no sentence-transformers pass at that size).

    The set is written into ``out/versions/<version>/`` and becomes live only when
    ``out/CURRENT`` is replaced at the very end, so a failed build leaves the last
    good set in place.

    ``events_dir``: an event log (``sieve events --archive``) whose ratings join the
    source's before the time split (``features/event_log.py``).
    """
    if (data_dir is None) == (synthetic == 0):
        raise ValueError("give either data_dir or synthetic=N")
    from candidate.embed import DIM, MODEL_ID, embed_texts, item_texts
    from candidate.index import (
        build_index,
        parse_search_params,
        resolve_auto,
        write_index,
    )
    from candidate.neighbours import cooccurrence_neighbours
    from candidate.shards import write_shards
    from candidate.towers import (
        HISTORY_INPUT,
        MASK_INPUT,
        USER_OUTPUT,
        TowerSpec,
        export_user_tower,
        train_towers,
    )
    from features.definitions import FEATURE_SERVICE, views
    from features.materialize import build_feature_repo
    from features.tables import item_table, user_table
    from ranker.features import MODEL_FEATURES, item_inputs
    from ranker.funnel import OfflineFunnel
    from ranker.train import (
        INPUT_NAME,
        OUTPUT_NAME,
        ModelSpec,
        train_and_export,
        training_rows,
    )

    out = Path(out)
    data_dir = Path(data_dir) if data_dir is not None else None
    cache_dir = Path(cache_dir) if cache_dir else out / "cache"
    now = datetime.now(UTC).replace(microsecond=0)
    version = _version(data_dir, synthetic, config, now)
    vdir = out / "versions" / version
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    report = BuildReport(version=version, root=vdir)
    t_all = time.perf_counter()
    positive = config.positive_rating

    emb: np.ndarray | None = None
    with report.stage(f"load + {config.split} time split"):
        if data_dir is not None:
            ml = load_movielens(data_dir)
            source: dict[str, Any] = {"data_dir": str(data_dir.resolve())}
        else:
            cat = synthetic_catalog(synthetic, seed=config.seed)
            ml = MovieLens(movies=cat.movies, ratings=cat.ratings, tags=cat.tags)
            emb = cat.embeddings
            source = {"synthetic": {"n_items": synthetic, "seed": config.seed}}
        if events_dir is not None:
            ml, source["events"] = with_event_ratings(ml, Path(events_dir))
            report.stats.update(events=source["events"])
        train, holdout = split(ml.ratings, config.holdout_fraction, config.split)
        # the validation split, carved from training the same way
        early, late = split(train, config.label_fraction, config.split)
        report.stats.update(
            items=len(ml.movies),
            users=int(ml.ratings["userId"].nunique()),
            ratings=len(ml.ratings),
            train=len(train),
            holdout=len(holdout),
            split=config.split,
        )
        holdout.to_parquet(vdir / "holdout.parquet", index=False)
        ml.movies.rename(columns={"movieId": "item_id"}).to_parquet(
            vdir / "catalog.parquet", index=False
        )

    if emb is None:
        with report.stage("embed item texts (all-MiniLM-L6-v2)"):
            texts = item_texts(ml.movies, ml.tags, config.top_tags)
            emb, n_new = embed_texts(
                texts, cache_dir / f"embeddings-{MODEL_ID}.npz", config.embedding_batch_size
            )
            report.stats.update(embedded=n_new, embedding_cache_hits=len(texts) - n_new)
    emb = np.ascontiguousarray(emb, np.float32)
    item_ids = ml.movies["movieId"].to_numpy(np.int64)
    genres = genre_multi_hot(ml.movies["genres"])
    tower_spec = TowerSpec(**config.retriever.model_dump(), seed=config.seed)
    window, top = config.neighbours_window, config.neighbours_top

    with report.stage("learned retriever on the earlier part (validation, training rows)"):
        towers_early = train_towers(early, item_ids, emb, genres, tower_spec)
        neighbours_early = cooccurrence_neighbours(early, item_ids, window, top)
    with report.stage("learned retriever on all training ratings, user tower to ONNX"):
        towers = train_towers(train, item_ids, emb, genres, tower_spec)
        tower_diff = export_user_tower(towers.model, tower_spec, vdir / "user_tower.onnx")
        neighbours = cooccurrence_neighbours(train, item_ids, window, top)
        np.save(vdir / "item_neighbours.npy", neighbours[0])
        np.save(vdir / "item_neighbour_scores.npy", neighbours[1])
        report.stats.update(
            retriever_samples=towers.samples,
            retriever_seconds=towers.seconds,
            retriever_losses=towers.losses,
        )

    with report.stage("feature tables + user vectors"):
        items = item_table(ml.movies, train)
        np.save(vdir / "item_embeddings.npy", towers.item_vectors)
        np.save(vdir / "text_embeddings.npy", emb)
        users = user_table(
            train,
            ml.movies,
            emb,
            positive,
            tower_spec.history,
            (towers.user_ids, towers.user_vectors),
        )
        for name, column in (("user_vectors", "user_vector"), ("text_user_vectors", "text_vector")):
            np.savez(
                vdir / f"{name}.npz",
                user_ids=users["user_id"].to_numpy(np.int64),
                vectors=np.stack(users[column].to_numpy()).astype(np.float32),
            )

    factory, search = resolve_auto(
        len(emb), config.index_factory, config.search_params, tower_spec.dim
    )
    text_factory, text_search = resolve_auto(
        len(emb),
        config.text_index_factory,
        config.text_search_params,
        DIM,
        k=config.sources.text,
    )
    for params in (search, text_search):
        parse_search_params(params)  # refuse a bad setting before the slow part
    with report.stage(f"faiss indexes: learned ({factory}), text ({text_factory})"):
        index = build_index(towers.item_vectors, factory, config.seed, config.train_size, True)
        write_index(index, vdir / "index.faiss")
        text_index = build_index(emb, text_factory, config.seed, config.train_size, True)
        write_index(text_index, vdir / "text_index.faiss")
    shard_files: dict[str, str] = {}
    shards = None
    if config.shards > 1:
        with report.stage(f"faiss shard indexes ({config.shards} shards)"):
            shard_files, shards = write_shards(
                vdir,
                item_ids,
                config.shards,
                {"index": factory, "text_index": text_factory},
                config.seed,
                config.train_size,
            )

    with report.stage("ranker training rows (every source, as served)"):
        items_early = item_table(ml.movies, early)
        users_early = user_table(
            early,
            ml.movies,
            emb,
            positive,
            tower_spec.history,
            (towers_early.user_ids, towers_early.user_vectors),
        ).set_index("user_id")
        funnel = OfflineFunnel(
            item_ids=item_ids,
            item_vectors=towers_early.item_vectors,
            text_embeddings=emb,
            neighbour_rows=neighbours_early[0],
            neighbour_scores=neighbours_early[1],
            popular_ids=item_ids[
                np.argsort(-items_early["log_popularity"].to_numpy(), kind="stable")
            ],
            item_cols=item_inputs(items_early),
            learned_search=_retrieval(
                build_index(towers_early.item_vectors, "Flat", config.seed, config.train_size),
                item_ids,
                {},
            ).top,
            text_search=_retrieval(text_index, item_ids, parse_search_params(text_search)).top,
            quotas=config.sources.model_dump(),
        )
        rows = training_rows(users_early, late, funnel, positive, config.train_users, config.seed)
        report.stats["validation_recall"] = rows.recall
    with report.stage("teacher + student, ONNX, INT8"):
        spec = ModelSpec(
            student_hidden=config.hidden,
            student_cross_layers=config.student_cross_layers,
            student_epochs=config.epochs,
            teacher_cross_layers=config.teacher_cross_layers,
            teacher_deep=config.teacher_deep,
            teacher_epochs=config.teacher_epochs,
            distill_alpha=config.distill_alpha,
            distill_top_weight=config.distill_top_weight,
            distill_list_weight=config.distill_list_weight,
            seed=config.seed,
        )
        result = train_and_export(rows, vdir, spec)
        report.stats.update(
            train_rows=result.n_rows,
            positive_share=round(result.positive_share, 4),
            val_auc={k: round(v, 4) for k, v in result.val_auc.items()},
            onnx_max_abs_diff=result.onnx_max_abs_diff,
            train_seconds=result.seconds,
        )

    project = f"{config.feast_project}_{version}"
    with report.stage("feast apply + materialize"):
        build_feature_repo(
            vdir / "feature_repo",
            project,
            config.online_store,
            {"user_features": users, "item_features": items},
            now,
        )

    files = {
        "index": "index.faiss",
        "text_index": "text_index.faiss",
        "user_tower": "user_tower.onnx",
        "item_neighbours": "item_neighbours.npy",
        "item_neighbour_scores": "item_neighbour_scores.npy",
        "text_embeddings": "text_embeddings.npy",
        "text_user_vectors": "text_user_vectors.npz",
        "model": result.files["student"],
        "model_int8": result.files["student_int8"],
        "teacher": result.files["teacher"],
        "catalog": "catalog.parquet",
        "user_vectors": "user_vectors.npz",
        "item_embeddings": "item_embeddings.npy",
        "holdout": "holdout.parquet",
        "feature_store": "feature_repo/feature_store.yaml",
        "user_features": "feature_repo/data/user_features.parquet",
        "item_features": "feature_repo/data/item_features.parquet",
        **shard_files,
    }
    report.stage_seconds["total"] = round(time.perf_counter() - t_all, 3)
    manifest = Manifest(
        version=version,
        created_at=now.isoformat(),
        source=source,
        files={role: artifacts.file_entry(vdir, rel) for role, rel in files.items()},
        index=IndexSection(
            factory=factory, search_params=search, dim=tower_spec.dim, ntotal=int(index.ntotal)
        ),
        text_index=IndexSection(
            factory=text_factory,
            search_params=text_search,
            dim=DIM,
            ntotal=int(text_index.ntotal),
        ),
        shards=shards,
        retriever=RetrieverSection(
            dim=tower_spec.dim,
            history=tower_spec.history,
            history_input=HISTORY_INPUT,
            mask_input=MASK_INPUT,
            output=USER_OUTPUT,
            onnx_max_abs_diff=tower_diff,
            samples=towers.samples,
            seconds=towers.seconds,
            validation=rows.recall,
        ),
        model=ModelSection(
            kind="distilled_mlp",
            hidden=config.hidden,
            cross_layers=config.student_cross_layers,
            teacher=TeacherSection(
                kind="dcn_v2",
                cross_layers=config.teacher_cross_layers,
                deep=config.teacher_deep,
            ),
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            features=MODEL_FEATURES,
            sources=config.sources.model_dump(),
            val_auc=result.val_auc,
            onnx_max_abs_diff=result.onnx_max_abs_diff,
            # a non-finite feature value at serving time is scored as the training mean
            feature_defaults=result.feature_defaults,
        ),
        feature_schema=FeatureSchemaSection(
            project=project,
            feature_service=FEATURE_SERVICE,
            genres=GENRES,
            views={
                v.name: ViewSection(
                    entity=v.entity,
                    join_key=v.join_key,
                    features={
                        f.name: FeatureSpecSection(kind=f.kind, dim=f.dim) for f in v.features
                    },
                )
                for v in views(tower_spec.dim)
            },
        ),
        build=BuildSection(
            config=config.model_dump(mode="json"),
            stats=report.stats,
            stage_seconds=report.stage_seconds,
        ),
    )
    artifacts.write_manifest(vdir, manifest)
    artifacts.publish(out, version)
    return report
