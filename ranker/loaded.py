"""One artifact set as the ranker serves it, and how it is loaded.

A ``LoadedSet`` holds everything a request scores with: the online-store reader,
the in-process item table, the model, the item embeddings and the popular items.
It is never mutated: the version holder (``sieve/versions.py``) swaps whole sets,
and a new materialization of item features makes a new ``LoadedSet`` of the same
version (``refreshed``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.definitions import ViewSpec, user_view, views
from features.item_table import ItemTable, ReadingChild, load_item_table
from features.reader import OnlineReader, open_reader
from ranker.config import RankerConfig
from ranker.device import providers
from ranker.diversity import compact_space
from ranker.features import MODEL_FEATURES
from ranker.rerank import AnyRule, item_attributes
from ranker.scorer import OnnxScorer
from ranker.user_tower import UserTower
from sieve import artifacts
from sieve.errors import ArtifactError
from sieve.ids import IdIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedSet:
    """Everything one artifact version serves with, swapped as a unit."""

    version: str
    reader: OnlineReader
    items: ItemTable
    scorer: OnnxScorer
    popular: np.ndarray  # item table rows, most popular first
    popular_ids: np.ndarray  # the same, as item ids
    feature_defaults: np.ndarray  # float32 [F]: what a non-finite feature value becomes
    embeddings: np.ndarray  # float32 [n, d], catalog order, memory-mapped
    catalog: IdIndex  # item id -> row of ``embeddings``
    registry_mtime: float
    registry_path: Path
    text_embeddings: np.ndarray  # float32 [n, 384], catalog order, memory-mapped
    diversity: np.ndarray  # float32 [n, d]: what the diversity rules compare (compact_space)
    neighbour_rows: np.ndarray  # int32 [n, top]: item-to-item neighbours (catalog rows)
    neighbour_scores: np.ndarray  # float32 [n, top]
    user_tower: UserTower
    quotas: dict[str, int]  # candidates per source (ranker/sources.py)
    user_view: ViewSpec  # the user view, its vector in this set's learned space

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalog rows of ``item_ids`` that the catalog holds."""
        rows, found = self.catalog.rows(item_ids)
        return rows[found]

    def diversity_of(self, item_ids: np.ndarray) -> np.ndarray:
        """What the diversity rules compare for catalog items (zeros for ids the
        catalog lacks): the text embeddings, content rather than co-consumption,
        on their ``rerank.diversity_dims`` principal directions. MMR over the
        learned vectors cost 4-6% of NDCG@10 for 1% more ILD (BENCHMARKS.md,
        Diversity)."""
        return embeddings_by_id(self.diversity, self.catalog, item_ids)

    def attribute_of(self, item_ids: np.ndarray, name: str) -> np.ndarray:
        """An item table column for ``item_ids`` (ids the table lacks are left out)."""
        rows, found = self.items.rows(item_ids)
        return self.items.columns[name][rows[found]]

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


def embeddings_by_id(embeddings: np.ndarray, catalog: IdIndex, item_ids: np.ndarray) -> np.ndarray:
    """Rows of ``embeddings`` (catalog order) for ``item_ids``, in memory; zeros
    for ids the catalog lacks."""
    rows, found = catalog.rows(item_ids)
    out = np.take(embeddings, rows, axis=0).astype(np.float32, copy=False)
    out[~found] = 0.0
    return out


def popular_of(items: ItemTable) -> tuple[np.ndarray, np.ndarray]:
    """(item table rows, item ids) most popular first (blocking: call it from a
    worker thread)."""
    popular = np.argsort(-items.columns["log_popularity"], kind="stable")
    return popular, items.ids[popular]


def touch_pages(array: np.ndarray, page_bytes: int = 4096) -> None:
    """Read one value per memory page of ``array`` (a memory-mapped file), so the
    process has every page mapped before requests need them."""
    flat = array.reshape(-1)
    step = max(1, page_bytes // flat.itemsize)
    float(np.asarray(flat[::step]).sum())


def warm_up(state: LoadedSet, rows: int) -> None:
    """Score ``rows`` rows of zeros a few times (ONNX Runtime's first calls are slow)."""
    x = np.zeros((rows, len(MODEL_FEATURES)), np.float32)
    for _ in range(3):
        state.scorer.score(x)


async def load_set(
    aset: artifacts.ArtifactSet,
    config: RankerConfig,
    rules: tuple[AnyRule, ...],
    child: ReadingChild | None = None,
    on_gpu: bool = False,
) -> LoadedSet:
    """Verify and load the files of ``aset`` the ranker reads, open its online store,
    read its item table (a large one in ``child``) and warm the model up (on CUDA
    with ``on_gpu``, decided once at start-up by ``ranker.device``); blocking work
    runs off the loop.

    Raises:
        ArtifactError: naming the missing, corrupt or unfit file (a refused set
            leaves no open connection behind).
    """
    model = aset.manifest.model
    manifest = aset.root / artifacts.MANIFEST
    if list(model.features) != list(MODEL_FEATURES):
        raise ArtifactError(
            f"{manifest}: model features {list(model.features)} are not "
            f"the features this ranker computes {list(MODEL_FEATURES)}"
        )
    role = {"fp32": "model", "int8": "model_int8"}[config.model]
    if role not in aset.manifest.files:
        raise ArtifactError(
            f"{manifest} has no {role} file (ranker.model = "
            f"{config.model!r}); rebuild the set or serve 'fp32'"
        )
    # Checksums of every file read here (1.5 GB of embeddings at 1M items) are
    # computed off the event loop: a reload must not stall the live requests (the
    # catalog's by ``read_catalog``, below).
    if aset.manifest.retriever is None or aset.manifest.text_index is None:
        raise ArtifactError(
            f"{manifest} has no learned retriever or text index (a set built before "
            "both were); rebuild it with this version's `sieve build`"
        )
    roles = (
        role,
        "feature_store",
        "item_embeddings",
        "text_embeddings",
        "user_tower",
        "item_neighbours",
        "item_neighbour_scores",
    )
    paths = await asyncio.to_thread(lambda: {r: aset.verified(r) for r in roles})
    scorer = OnnxScorer(
        str(paths[role]), model.input_name, model.output_name, model.features,
        config.intra_op_threads, providers(on_gpu),
    )  # fmt: skip
    await asyncio.to_thread(scorer.load)
    tower = UserTower(str(paths["user_tower"]), aset.manifest.retriever)
    await asyncio.to_thread(tower.load)
    repo = paths["feature_store"].parent
    rel = config.reliability
    reader = open_reader(repo, rel.redis_pool_size, rel.redis_timeout_s)
    await reader.start()
    try:
        await asyncio.to_thread(reader.prepare, views(aset.manifest.index.dim))
        state = await _state_of(aset, config, rules, scorer, tower, reader, repo, child)
        await asyncio.to_thread(warm_up, state, sum(state.quotas.values()))
        return state
    except BaseException:
        await reader.close()
        raise


async def _state_of(
    aset: artifacts.ArtifactSet,
    config: RankerConfig,
    rules: tuple[AnyRule, ...],
    scorer: OnnxScorer,
    tower: UserTower,
    reader: OnlineReader,
    repo: Path,
    child: ReadingChild | None,
) -> LoadedSet:
    """The rest of a set's state: item table, popularity, embeddings, read
    through ``reader`` (sorting and file reads in a worker thread).

    Raises:
        ArtifactError: the store holds no items, or the embeddings do not fit.
    """
    catalog_ids = (await asyncio.to_thread(aset.read_catalog, ["item_id"]))["item_id"].to_numpy(
        np.int64
    )
    items = await load_item_table(
        reader, catalog_ids, repo, config.item_load_process_min_items, child
    )
    if len(items) == 0:
        raise ArtifactError(f"online store of {repo} holds no item features (materialized?)")
    for i, name, groups in item_attributes(rules):
        col = items.columns.get(name)
        if col is None or (groups and col.ndim != 1):
            one_d = sorted(c for c, v in items.columns.items() if v.ndim == 1)
            raise ArtifactError(
                f"ranker.rerank.rules[{i}] ({rules[i].name}) reads item attribute "
                f"{name!r}, which the item features of {repo} lack; one of {one_d}"
            )
    registry = repo / "registry.db"
    mtime = registry.stat().st_mtime if registry.exists() else 0.0
    log.info("ranker loaded %s: %d items, model %s", aset.version, len(items), scorer.path)
    model = aset.manifest.model
    defaults = np.asarray(model.feature_defaults or [0.0] * len(MODEL_FEATURES), np.float32)
    # A plain ndarray over the mapping: np.memmap's own indexing costs Python
    # calls on every gather.
    embeddings = np.asarray(np.load(aset.path("item_embeddings"), mmap_mode="r"))
    if embeddings.ndim != 2 or embeddings.shape[0] != len(catalog_ids):
        raise ArtifactError(
            f"{aset.path('item_embeddings')} has {embeddings.shape[0]} rows, "
            f"the catalog {len(catalog_ids)}"
        )
    dim = aset.manifest.index.dim
    if embeddings.shape[1] != dim:
        raise ArtifactError(
            f"{aset.path('item_embeddings')} holds {embeddings.shape[1]}-dim vectors; "
            f"the manifest's index has dim {dim}"
        )
    text = np.asarray(np.load(aset.path("text_embeddings"), mmap_mode="r"))
    nb_rows = np.asarray(np.load(aset.path("item_neighbours"), mmap_mode="r"))
    nb_scores = np.asarray(np.load(aset.path("item_neighbour_scores"), mmap_mode="r"))
    for what, arr, width in (
        ("text_embeddings", text, aset.manifest.text_index.dim if aset.manifest.text_index else 0),
        ("item_neighbours", nb_rows, nb_scores.shape[1] if nb_scores.ndim == 2 else -1),
        ("item_neighbour_scores", nb_scores, nb_rows.shape[1] if nb_rows.ndim == 2 else -1),
    ):
        if arr.ndim != 2 or arr.shape != (len(catalog_ids), width):
            raise ArtifactError(
                f"{aset.path(what)} has shape {arr.shape}, expected ({len(catalog_ids)}, {width})"
            )
    # Map every page now: requests gather ~1,500 random rows (every candidate's
    # vectors), and each first touch of a page is a fault.
    for arr in (embeddings, text):
        await asyncio.to_thread(touch_pages, arr)
    dims = config.rerank.diversity_dims
    diversity = (
        await asyncio.to_thread(compact_space, text, dims) if 0 < dims < text.shape[1] else text
    )
    catalog = await asyncio.to_thread(IdIndex, catalog_ids)
    popular, popular_ids = await asyncio.to_thread(popular_of, items)
    return LoadedSet(
        version=aset.version,
        reader=reader,
        items=items,
        scorer=scorer,
        popular=popular,
        popular_ids=popular_ids,
        feature_defaults=defaults,
        embeddings=embeddings,
        catalog=catalog,
        registry_mtime=mtime,
        registry_path=registry,
        text_embeddings=text,
        diversity=diversity,
        neighbour_rows=nb_rows,
        neighbour_scores=nb_scores,
        user_tower=tower,
        quotas=dict(model.sources),
        user_view=user_view(aset.manifest.index.dim),
    )


async def refreshed(
    state: LoadedSet, config: RankerConfig, child: ReadingChild | None = None, force: bool = False
) -> LoadedSet | None:
    """``state`` with its item table read again when Feast's registry changed (a
    new materialization landed), or None when it did not."""
    path = state.registry_path
    mtime = path.stat().st_mtime if path.exists() else 0.0
    if not force and mtime == state.registry_mtime:
        return None
    items = await load_item_table(
        state.reader, state.items.ids, path.parent, config.item_load_process_min_items, child
    )
    popular, popular_ids = await asyncio.to_thread(popular_of, items)
    return dataclasses.replace(
        state, items=items, popular=popular, popular_ids=popular_ids, registry_mtime=mtime
    )
