"""Loading one artifact set's index for the candidate service: verify, read, place
on the GPU when there is one, warm up. The version holder (``sieve/versions.py``)
keeps the sets and swaps them; the servicer only searches them."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from candidate.config import CandidateConfig
from candidate.device import faiss_gpu
from candidate.index import CandidateIndex, gpu_count, parse_search_params, set_gpu_params, to_gpu
from candidate.shards import check_shard, shard_role, shard_rows
from sieve import artifacts
from sieve.device import decide
from sieve.errors import ArtifactError, ConfigError, InvalidRequest
from sieve.validation import echo

log = logging.getLogger(__name__)


SPACES = ("learned", "text")
"""The spaces a set serves: the learned retriever's (the main index) and the text one."""


@dataclass(frozen=True)
class LiveIndex:
    """One loaded artifact set; never mutated, so a request that took it keeps a
    consistent index and version through a swap. ``text`` is the same set's text
    space (its own ``LiveIndex``, so a batch of searches groups by space)."""

    index: CandidateIndex
    version: str
    text: LiveIndex | None = None
    shard: int = -1  # of a sharded set; -1: the whole catalog
    shards: int = 0  # the set's shard count; 0: not sharded

    def space(self, source: str) -> LiveIndex:
        """The space a RetrieveRequest's ``source`` names ("" is the learned one).

        Raises:
            InvalidRequest: an unknown source, or a set without a text index.
        """
        if source in ("", "learned"):
            return self
        if source == "text":
            if self.text is None:
                raise InvalidRequest(
                    f"artifact set {self.version} has no text index; source must be 'learned'"
                )
            return self.text
        raise InvalidRequest(f"source must be one of {list(SPACES)} (or empty), got {echo(source)}")


def category_masks(genres: pd.Series) -> dict[str, np.ndarray]:
    """Catalog genre strings ("A|B") -> {genre: bool mask over catalog rows}.

    A catalog has few distinct genre strings: each is split once, then every
    genre's mask is a lookup over the factorized codes (1M rows in ~0.1 s).
    """
    codes, uniques = pd.factorize(genres.fillna("").astype(str))
    parts = [set(u.split("|")) - {""} for u in uniques]
    names = sorted(set().union(*parts)) if parts else []
    return {name: np.array([name in p for p in parts], bool)[codes] for name in names}


def use_gpu(config: CandidateConfig) -> bool:
    """Whether to search on a GPU, decided once at start-up: only when a test search
    on GPU ``gpu_id`` answers what the CPU answers (``candidate.device.faiss_gpu``).

    Raises:
        ConfigError: ``device`` is ``gpu`` and that GPU is not usable, or
            ``gpu_id`` names a GPU Faiss does not see.
    """
    gpus = gpu_count()
    if config.device != "cpu" and gpus > 0 and config.gpu_id >= gpus:
        raise ConfigError(f"candidate.gpu_id is {config.gpu_id}, Faiss sees {gpus} GPU(s)")
    batching = "retrieve batching " + ("on" if config.batching == "on" else "off")
    return decide("candidate.device", config.device, lambda: faiss_gpu(config.gpu_id), batching)


async def load_live(config: CandidateConfig, root: Path, version: str, on_gpu: bool) -> LiveIndex:
    """Load ``version`` under ``root`` (off the event loop) and warm its index up.

    Raises:
        ArtifactError: naming the missing, corrupt or malformed file.
    """
    index, text, shards = await asyncio.to_thread(load_index, config, root, version, on_gpu)
    await asyncio.to_thread(index.warm_up, min(1000, config.max_k))
    if text is not None:
        await asyncio.to_thread(text.warm_up, min(1000, config.max_k))
    shard = config.shard if shards else -1
    return LiveIndex(
        index,
        version,
        LiveIndex(text, version, None, shard, shards) if text is not None else None,
        shard,
        shards,
    )


def load_index(
    config: CandidateConfig, root: Path, version: str, on_gpu: bool
) -> tuple[CandidateIndex, CandidateIndex | None, int]:
    """The learned index of ``version`` under ``root``, verified, on the GPU when
    ``on_gpu``, its text index (on the CPU) when the set has one, and the set's
    shard count (0: not sharded). With ``config.shard`` set, the indexes are that
    shard's, over its items only."""
    import faiss

    faiss.omp_set_num_threads(config.omp_threads)
    aset = artifacts.load(root, version)
    catalog = aset.read_catalog(["item_id", "genres"])
    item_ids = catalog["item_id"].to_numpy(np.int64)
    m = aset.manifest
    role, text_role, rows = "index", "text_index", None
    if config.shard >= 0:
        section = check_shard(m, config.shard, aset.root / artifacts.MANIFEST)
        rows = shard_rows(item_ids, section.count, config.shard)
        role, text_role = shard_role(role, config.shard), shard_role(text_role, config.shard)
        item_ids, catalog = item_ids[rows], catalog.iloc[rows]
    masks = category_masks(catalog["genres"])
    try:
        search_params = parse_search_params(m.index.search_params)
        text_params = parse_search_params(m.text_index.search_params) if m.text_index else {}
    except ValueError as e:
        raise ArtifactError(f"{aset.root / artifacts.MANIFEST}: index: {e}") from e
    index_path = aset.verified(role)  # reading it for the checksum warms the cache too
    index = CandidateIndex.load(
        index_path,
        item_ids,
        aset.verified("user_vectors"),
        mmap=config.index_mmap,
        search_params=search_params,
        categories=masks,
    )
    text = None
    if m.text_index is not None:
        text = CandidateIndex.load(
            aset.verified(text_role),
            item_ids,
            aset.verified("text_user_vectors"),
            mmap=config.index_mmap,
            search_params=text_params,
            categories=masks,
        )
    where = "CPU"
    if on_gpu:
        embeddings = None
        if config.gpu_index == "flat":
            embeddings = np.load(aset.verified("item_embeddings"), mmap_mode="r")
            if rows is not None and len(embeddings) > rows[-1]:
                embeddings = embeddings[rows]
            if embeddings.shape != (index.index.ntotal, index.dim):
                raise ArtifactError(
                    f"item embeddings {aset.path('item_embeddings')} have shape "
                    f"{embeddings.shape}, the index {(index.index.ntotal, index.dim)}"
                )
        index.accelerated = to_gpu(index.index, embeddings, config.gpu_id)
        if embeddings is None:
            set_gpu_params(index.accelerated.index, index.search_params)
        where = f"GPU {config.gpu_id} ({config.gpu_index})"
    log.info(
        "candidate index %s%s: %d items, dim %d, %s, searched on %s",
        aset.version,
        f" shard {config.shard}/{m.shards.count}" if rows is not None and m.shards else "",
        index.index.ntotal,
        index.dim,
        aset.manifest.index.factory,
        where,
    )
    return index, text, m.shards.count if m.shards else 0
