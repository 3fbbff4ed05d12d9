"""Feast definitions for sieve: entities, feature views and the model's service.

The schema is declared once, as plain data (``USER_VIEW``, ``ITEM_VIEW``), and
both the Feast objects and our fast online reader are derived from it, so the two
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

FeatureKind = Literal["float", "int64", "float_list", "int64_list"]


@dataclass(frozen=True)
class FeatureSpec:
    """One feature: its name, value kind and, for fixed-size float lists, dim."""

    name: str
    kind: FeatureKind
    dim: int = 0


@dataclass(frozen=True)
class ViewSpec:
    """One feature view keyed by a single Int64 join key."""

    name: str
    entity: str
    join_key: str
    features: tuple[FeatureSpec, ...]

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no feature {name!r}")


EMBEDDING_DIM = 384
"""Dimension of the MiniLM text embeddings (the text source's space)."""
RETRIEVAL_DIM = 64
"""Default dimension of the learned retriever's space (``[build.retriever] dim``)."""
N_GENRES = 20
HISTORY_YEARS = 24
"""Length of an item's ``rating_history``: bin k counts its ratings in the k-th year
before the training cut-off (0: the last year); the last bin gathers all older."""


def user_view(vector_dim: int = RETRIEVAL_DIM) -> ViewSpec:
    """The user view, with ``user_vector`` in the learned space of ``vector_dim``
    (a set's manifest says which: ``index.dim``)."""
    return ViewSpec(
        name="user_features",
        entity="user",
        join_key="user_id",
        features=(
            # the user tower's output on the whole training history (the learned
            # source's query when the request-time tower cannot run)
            FeatureSpec("user_vector", "float_list", vector_dim),
            # the mean text embedding of the liked items (the text source's query)
            FeatureSpec("text_vector", "float_list", EMBEDDING_DIM),
            FeatureSpec("genre_affinity", "float_list", N_GENRES),
            FeatureSpec("rating_count", "int64"),
            FeatureSpec("rating_mean", "float"),
            FeatureSpec("rating_std", "float"),
            FeatureSpec("idle_years", "float"),
            FeatureSpec("seen_item_ids", "int64_list"),
            # the last rated items, oldest first: the user tower's input at request
            # time and the item-to-item source's seeds
            FeatureSpec("recent_item_ids", "int64_list"),
        ),
    )


USER_VIEW = user_view()
ITEM_VIEW = ViewSpec(
    name="item_features",
    entity="item",
    join_key="item_id",
    # Item embeddings are not online features: they live in the index and in the
    # artifact set's item_embeddings.npy (memory-mapped). Materializing 1M x 384
    # floats through Feast needed over 24 GB and would copy 1.5 GB into Redis.
    features=(
        FeatureSpec("genres", "float_list", N_GENRES),
        FeatureSpec("primary_genre", "int64"),
        FeatureSpec("log_popularity", "float"),
        FeatureSpec("rating_mean", "float"),
        FeatureSpec("age_years", "float"),
        FeatureSpec("rating_history", "float_list", HISTORY_YEARS),
    ),
)
VIEWS = (USER_VIEW, ITEM_VIEW)
FEATURE_SERVICE = "ranker_v3"
"""The FeatureService the ranking model reads; its name goes in the manifest (v3:
the learned user vector, the text vector and the recent items, for the candidate
sources; v2 added the features of time)."""


def views(vector_dim: int = RETRIEVAL_DIM) -> tuple[ViewSpec, ViewSpec]:
    """``VIEWS`` with the user vector in a ``vector_dim`` space."""
    return (user_view(vector_dim), ITEM_VIEW)


TIMESTAMP_FIELD = "event_timestamp"


def feast_view(spec: ViewSpec, source: Any) -> tuple[Any, Any]:
    """The Feast entity and online feature view of ``spec``, fed by ``source`` (a
    file source, or a push source over one)."""
    from feast import Entity, FeatureView, Field, ValueType
    from feast.types import Array, Float32, Int64

    types: dict[str, Any] = {
        "float": Float32,
        "int64": Int64,
        "float_list": Array(Float32),
        "int64_list": Array(Int64),
    }
    entity = Entity(name=spec.entity, join_keys=[spec.join_key], value_type=ValueType.INT64)
    view = FeatureView(
        name=spec.name,
        entities=[entity],
        ttl=timedelta(days=3650),
        schema=[Field(name=spec.join_key, dtype=Int64)]
        + [Field(name=f.name, dtype=types[f.kind]) for f in spec.features],
        source=source,
        online=True,
    )
    return entity, view


def feature_definitions(offline_dir: Path) -> list[object]:
    """Feast objects over the parquet files in ``offline_dir``.

    ``offline_dir`` must hold ``user_features.parquet`` and ``item_features.parquet``
    (written by ``features.materialize.write_offline``).
    """
    from feast import FeatureService, FileSource

    objects: list[object] = []
    views: list[Any] = []
    for spec in VIEWS:
        source = FileSource(
            name=f"{spec.name}_source",
            path=str(Path(offline_dir).resolve() / f"{spec.name}.parquet"),
            timestamp_field=TIMESTAMP_FIELD,
        )
        entity, view = feast_view(spec, source)
        objects += [entity, view]
        views.append(view)
    objects.append(FeatureService(name=FEATURE_SERVICE, features=views))
    return objects
