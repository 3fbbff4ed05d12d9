"""``manifest.json``: the one typed model of an artifact set's manifest.

Written by the build (``app/build.py``), read and verified by both services, the
benchmarks and the ``sieve`` tools. A manifest that does not fit the model is
refused at load (``parse``) with the path of the field that is wrong, as a bad
``sieve.toml`` is.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from sieve.config import Frozen

FORMAT = 1
VERSION_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")


class FileEntry(Frozen):
    """One file of the set, relative to its version folder."""

    path: str
    sha256: str
    bytes: int = Field(ge=0)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("has no 'sha256' of 64 hex digits")
        return v

    @model_validator(mode="after")
    def _inside_the_set(self) -> FileEntry:
        rel = PurePosixPath(self.path)
        if not self.path or rel.is_absolute() or "\\" in self.path or ".." in rel.parts:
            raise ValueError(f"names {self.path!r}, a path outside the artifact set")
        return self


class IndexSection(Frozen):
    """The Faiss index over the item embeddings."""

    factory: str
    """``index_factory`` string the index was built with."""
    search_params: str = ""
    """Faiss ParameterSpace syntax (``nprobe=128``); empty for exact search."""
    metric: Literal["inner_product"] = "inner_product"
    dim: int = Field(ge=1)
    ntotal: int = Field(ge=0)


class ShardsSection(Frozen):
    """The catalog partitioned for a sharded candidate service (``[build] shards``):
    shard ``i`` holds the items whose ``candidate.shards.shard_of`` is ``i``, in
    catalog order, in files ``index.shard<i>`` and ``text_index.shard<i>``."""

    count: int = Field(ge=2, le=256)
    key: Literal["splitmix64(item_id) mod count"] = "splitmix64(item_id) mod count"
    ntotal: tuple[int, ...]
    """Items in each shard, in shard order."""

    @model_validator(mode="after")
    def _one_count_per_shard(self) -> ShardsSection:
        if len(self.ntotal) != self.count:
            raise ValueError(f"lists {len(self.ntotal)} shard sizes for {self.count} shards")
        return self


class RetrieverSection(Frozen):
    """The learned retriever: its user tower (ONNX), run by the ranker per request."""

    kind: str = "two_tower"
    dim: int = Field(ge=1)
    history: int = Field(ge=1)
    """The user tower's input: the last this-many items' vectors, oldest first."""
    history_input: str
    mask_input: str
    output: str
    onnx_max_abs_diff: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    validation: dict[str, float] = {}
    """Recall and NDCG of the towers trained on the earlier part of training,
    measured on its later part (the validation split)."""


class TeacherSection(Frozen):
    kind: str
    cross_layers: int = Field(ge=0)
    deep: tuple[int, ...]


class ModelSection(Frozen):
    """The ranking model the ranker serves (the student) and how it was made."""

    kind: str = "distilled_mlp"
    hidden: tuple[int, ...] = ()
    cross_layers: int = Field(0, ge=0)
    teacher: TeacherSection | None = None
    input_name: str
    output_name: str
    features: tuple[str, ...]
    """Model inputs in column order; the ranker refuses a set whose features are
    not the ones it computes."""
    sources: dict[str, int] = {}
    """Candidate quotas per source (``ranker/sources.py``), training and serving."""
    popular_candidates: int = Field(0, ge=0)
    """Sets built before the candidate sources: their popular quota. Read so that
    such a set loads far enough to be refused by name (the ranker needs its
    learned retriever); unused."""
    val_auc: dict[str, float] = {}
    onnx_max_abs_diff: dict[str, float] = {}
    feature_defaults: tuple[float, ...] | None = None
    """What a non-finite feature value is scored as (the training mean); None: 0."""


class FeatureSpecSection(Frozen):
    kind: str
    dim: int | None = None


class ViewSection(Frozen):
    entity: str
    join_key: str
    features: dict[str, FeatureSpecSection]


class FeatureSchemaSection(Frozen):
    """The Feast project the set materialized and the views it holds."""

    project: str
    feature_service: str
    genres: tuple[str, ...] = ()
    views: dict[str, ViewSection] = {}


class BuildSection(Frozen):
    """How the set was built: the config, counts and the time of each stage."""

    config: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    stage_seconds: dict[str, float] = {}


class Manifest(Frozen):
    """``manifest.json`` of one artifact set."""

    format: Literal[1] = 1
    version: str
    created_at: str = ""
    source: dict[str, Any] = {}
    """``{"data_dir": ...}`` or ``{"synthetic": {"n_items": N, "seed": S}}``."""
    files: dict[str, FileEntry]
    """Role (``index``, ``model``, ``catalog``, ...) -> file."""
    index: IndexSection
    """The main index: the learned retriever's item vectors."""
    text_index: IndexSection | None = None
    """The text source's index over the MiniLM item embeddings (role ``text_index``)."""
    shards: ShardsSection | None = None
    """None: one candidate process serves the whole catalog (``index``, ``text_index``)."""
    retriever: RetrieverSection | None = None
    model: ModelSection
    feature_schema: FeatureSchemaSection
    build: BuildSection = BuildSection()

    @field_validator("version", mode="before")
    @classmethod
    def _version_name(cls, v: object) -> object:
        if not isinstance(v, str) or not VERSION_RE.match(v):
            raise ValueError(f"is {v!r}, not a version name")
        return v

    def to_json(self) -> str:
        """The file's text: sorted keys, indented, one trailing newline."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def _where(loc: tuple[int | str, ...]) -> str:
    """``('files', 'catalog', 'sha256')`` -> ``files['catalog']['sha256']``;
    a top-level key alone is quoted: ``'files'``."""
    if not loc:
        return "the manifest"
    if len(loc) == 1:
        return repr(loc[0])
    return str(loc[0]) + "".join(f"[{k!r}]" for k in loc[1:])


def problem(e: ValidationError) -> str:
    """The first error of a manifest's validation, in words with the field's path,
    to follow the file's name: `` lacks 'files'``, ``: files['catalog'] lacks
    'sha256'``, ``: 'model' is a str, not an object``."""
    err = e.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "missing":
        if len(loc) == 1:
            return f" lacks {loc[0]!r}"
        parent = str(loc[0]) + "".join(f"[{k!r}]" for k in loc[1:-1])
        return f": {parent} lacks {loc[-1]!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f": {_where(loc)} is a {type(err['input']).__name__}, not an object"
    if kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        return f": {_where(loc)} {msg}"
    if kind == "extra_forbidden":
        return f": {_where(loc)} is not a field of a sieve manifest"
    return f": {_where(loc)}: {err['msg']} (got {err.get('input')!r})"
