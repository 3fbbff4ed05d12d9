"""A sharded candidate index: the catalog partitioned into S parts at build time,
one Faiss index per part and space, each served by its own candidate process
(``sieve serve --only candidate --shard i``); the ranker scatters a Retrieve to
every shard and merges their top-k by score (``ranker/scatter.py``).

Items go to shards by a hash of their id, not by catalog position, so an item
keeps its shard when the catalog grows or is reordered, and every shard gets a
fair share of each genre and popularity band (a range of ids would not: ids
grow with time, and new items are the ones users look for). Within a shard the
rows keep catalog order, so shard row j is catalog row ``rows[j]``.

Each shard index is built and trained on its own items only, as it would be on a
host that holds only them: at S shards the per-shard IVF has the same number of
lists over 1/S of the items, so a probe scans fewer vectors and the recall of the
merge is at least the whole index's at the same ``nprobe`` (measured in
BENCHMARKS.md, "A sharded index").
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sieve import artifacts
from sieve.errors import ArtifactError
from sieve.manifest import Manifest, ShardsSection

log = logging.getLogger(__name__)

SPACE_ROLES = {"learned": "index", "text": "text_index"}
"""The space -> the manifest role of its whole-catalog index; shard i's is
``<role>.shard<i>``."""
EMBEDDING_ROLES = {"index": "item_embeddings", "text_index": "text_embeddings"}
"""The vectors each index is built from (catalog order)."""


def shard_role(role: str, shard: int) -> str:
    return f"{role}.shard{shard}"


def shard_of(item_ids: np.ndarray, count: int) -> np.ndarray:
    """The shard (0..count-1) of each item id: splitmix64 of the id, mod ``count``.

    splitmix64's finaliser mixes every bit of the id into every bit of the hash,
    so consecutive ids (MovieLens', a synthetic catalog's) spread evenly."""
    z = np.asarray(item_ids, np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(count)).astype(np.int64)


def shard_rows(item_ids: np.ndarray, count: int, shard: int) -> np.ndarray:
    """Catalog rows of shard ``shard`` of ``count``, in catalog order."""
    return np.flatnonzero(shard_of(item_ids, count) == shard)


def write_shards(
    vdir: Path,
    item_ids: np.ndarray,
    count: int,
    factories: dict[str, str],
    seed: int = 0,
    train_size: int = 200_000,
) -> tuple[dict[str, str], ShardsSection]:
    """Build and write the shard indexes of a set in version folder ``vdir``.

    Args:
        item_ids: the catalog's ids, in catalog order.
        factories: manifest role (``index``, ``text_index``) -> the ``index_factory``
            string its whole-catalog index was built with; each shard is built with
            the same one, over the role's embeddings file (``EMBEDDING_ROLES``).

    Returns:
        (role -> file name relative to ``vdir``, the manifest's shards section).

    Raises:
        ValueError: fewer than 2 shards, or a shard with no items.
    """
    from candidate.index import build_index, write_index

    if count < 2:
        raise ValueError(f"shards must be at least 2 to shard, got {count}")
    which = shard_of(item_ids, count)
    sizes = np.bincount(which, minlength=count)
    if sizes.min() == 0:
        raise ValueError(f"{len(item_ids)} items leave a shard of {count} empty")
    files: dict[str, str] = {}
    for role, factory in factories.items():
        vectors = np.load(vdir / f"{EMBEDDING_ROLES[role]}.npy", mmap_mode="r")
        if len(vectors) != len(item_ids):
            raise ValueError(
                f"{EMBEDDING_ROLES[role]} has {len(vectors)} rows, the catalog {len(item_ids)}"
            )
        for i in range(count):
            part = np.ascontiguousarray(vectors[which == i], np.float32)
            index = build_index(part, factory, seed + i, train_size)
            name = f"{role}.shard{i}.faiss"
            write_index(index, vdir / name)
            files[shard_role(role, i)] = name
            log.info("%s shard %d/%d: %d items (%s)", role, i, count, len(part), factory)
    return files, ShardsSection(count=count, ntotal=tuple(int(n) for n in sizes))


def reshard(root: Path, version: str, new_version: str, count: int, seed: int = 0) -> Path:
    """A copy of set ``version`` under ``root`` (hard links) as ``new_version``,
    with ``count`` shard indexes built like the whole ones, not published.

    What ``[build] shards`` does at the end of a build, for a set already built
    (the 1M benchmark sets skip retraining this way).

    Raises:
        ArtifactError: ``version`` is not a readable set.
    """
    src = artifacts.load(root, version)
    dest = artifacts.clone_version(src.root, Path(root) / "versions" / new_version, link=True)
    m = src.manifest
    item_ids = src.read_catalog(["item_id"])["item_id"].to_numpy(np.int64)
    factories = {"index": m.index.factory}
    if m.text_index is not None:
        factories["text_index"] = m.text_index.factory
    train_size = int(m.build.config.get("train_size", 200_000))
    # The clone's files are links to the source's: unlink the old shard files
    # before anything is written under their names.
    for role, entry in m.files.items():
        if ".shard" in role:
            (dest / entry.path).unlink(missing_ok=True)
    kept = {r: e for r, e in m.files.items() if ".shard" not in r}
    files, section = write_shards(dest, item_ids, count, factories, seed, train_size)
    entries = {**kept, **{r: artifacts.file_entry(dest, rel) for r, rel in files.items()}}
    manifest = Manifest.model_validate(
        {**m.model_dump(), "version": new_version, "files": entries, "shards": section}
    )
    artifacts.write_manifest(dest, manifest)
    return dest


def check_shard(manifest: Manifest, shard: int, where: Path) -> ShardsSection:
    """The set's shards section when it has shard ``shard``.

    Raises:
        ArtifactError: the set is not sharded, or has fewer shards.
    """
    s = manifest.shards
    if s is None:
        raise ArtifactError(
            f"{where}: candidate.shard is {shard}, but set {manifest.version} is not sharded "
            "(build it with [build] shards = S, or serve it without --shard)"
        )
    if shard >= s.count:
        raise ArtifactError(
            f"{where}: candidate.shard is {shard}, set {manifest.version} has {s.count} shards "
            f"(0..{s.count - 1})"
        )
    return s
