"""``sieve.toml``: the offline build's configuration, and every section assembled
into ``SieveConfig`` from the models each stage keeps beside its code."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field

from candidate.config import CandidateConfig
from features.config import OnlineStoreConfig, SqliteStoreConfig
from ranker.config import RankerConfig
from sieve.config import Frozen
from sieve.errors import ConfigError
from sieve.logs import LoggingConfig


class RetrieverConfig(Frozen):
    """The learned retriever: two towers trained with in-batch sampled softmax and
    logQ correction (``candidate/towers.py``). Defaults chosen on the validation
    split carved from training (BENCHMARKS.md, Quality)."""

    dim: int = Field(64, ge=8, le=256)
    """Dimension of the learned space the candidate index serves (64-128 usual;
    the ANN's cost grows with it)."""
    history: int = Field(50, ge=1, le=500)
    """The user tower reads the user's last this-many rated items."""
    target_rating: float = Field(0.0, ge=0.0, le=5.0)
    """Ratings at or above this are the towers' targets (0: every rating). On the
    validation split every rating gave recall@800 0.799 against 0.780 for ratings
    >= 4 alone (BENCHMARKS.md, Quality)."""
    epochs: int = Field(10, ge=1, le=200)
    temperature: float = Field(0.05, gt=0.0, le=1.0)
    """Softmax temperature of the in-batch loss."""
    id_dropout: float = Field(0.5, ge=0.0, le=1.0)
    """Share of items whose id embedding is dropped in each batch (their vector
    comes from text, genres and popularity alone, as an unrated item's does)."""
    hidden: int = Field(256, ge=8, le=4096)
    batch_size: int = Field(1024, ge=16, le=65536)
    lr: float = Field(2e-3, gt=0.0, le=1.0)
    max_samples: int = Field(2_000_000, ge=1000)
    """At most this many (history, next positive) pairs train the towers (seeded sample)."""
    max_steps: int = Field(2000, ge=1)
    """Epochs are cut so that training takes at most this many batches (at least one
    epoch): a large catalog's many samples need fewer passes, and this bounds the
    build's time (ml-latest-small: 31 batches an epoch, 10 epochs)."""


class SourcesConfig(Frozen):
    """Per-source candidate quotas (``ranker/sources.py``): each source adds up to
    this many items no earlier source gave. Training rows are drawn with them and
    the manifest carries them to the ranker."""

    learned: int = Field(1200, ge=1, le=2048)
    """From the learned ANN (the candidate service's main index)."""
    text: int = Field(100, ge=0, le=2048)
    """From the text ANN (reaches items nobody rated)."""
    i2i: int = Field(100, ge=0, le=2048)
    """Co-occurrence neighbours of the user's last items."""
    popular: int = Field(100, ge=0, le=2048)
    """The most popular items."""


class BuildConfig(Frozen):
    """The offline jobs of ``sieve build``."""

    split: Literal["user", "global"] = "user"
    """How ratings are held out for evaluation: ``user``, each user's latest
    ``holdout_fraction``; ``global``, everything after one time T (the
    ``1 - holdout_fraction`` quantile of rating times), so no feature, index or
    model sees any rating after T, as a served request never sees the future."""
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of each user's latest ratings held out for evaluation (at least one
    rating is held out and at least one kept for training)."""
    positive_rating: float = Field(4.0, ge=0.5, le=5.0)
    """A rating at or above this is a positive interaction."""
    top_tags: int = Field(3, ge=0, le=20)
    """How many of an item's most frequent tags go into its text."""
    embedding_batch_size: int = Field(64, ge=1, le=4096)
    index_factory: str = "auto"
    """Faiss ``index_factory`` string of the learned space's index (the main one),
    inner-product metric (e.g. ``IVF4096,SQ8``), or ``auto``: exact ``Flat`` below
    200k items, the measured IVF default for its dimension above."""
    search_params: str = "auto"
    """Faiss ParameterSpace syntax, e.g. ``nprobe=128`` or ``nprobe=64,k_factor=4``
    (keys: nprobe, k_factor, efSearch); ``auto`` goes with ``index_factory``."""
    text_index_factory: str = "auto"
    """The same for the text space's index (384 dimensions)."""
    text_search_params: str = "auto"
    train_size: int = Field(200_000, ge=1_000)
    """Rows sampled (seeded) to train the index's quantizers."""
    shards: int = Field(1, ge=1, le=256)
    """Partition the catalog into this many candidate shards (``candidate/shards.py``):
    besides the whole indexes, each space gets one index per shard, served by
    ``sieve serve --only candidate --shard i`` and merged by the ranker
    (``[ranker] candidate_shards``). 1: no shard files."""
    label_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of each user's latest training ratings that label the ranker's
    training rows (the earlier part gives their features and candidates)."""
    train_users: int = Field(1000, ge=1)
    """At most this many users (seeded sample) give the ranker's training rows."""
    retriever: RetrieverConfig = RetrieverConfig()
    sources: SourcesConfig = SourcesConfig()
    neighbours_window: int = Field(10, ge=1, le=200)
    """Two items co-occur when a user rated them within this many ratings."""
    neighbours_top: int = Field(50, ge=1, le=500)
    """Neighbours kept per item for the item-to-item source."""
    hidden: tuple[int, ...] = (64, 32)
    """Hidden layer widths of the student MLP (the served model)."""
    student_cross_layers: int = Field(0, ge=0, le=4)
    """DCN-v2 cross layers beside the student's MLP (0: a plain MLP, which keeps
    the teacher's NDCG@10 as one cross layer does, at less cost per row).
    1000 rows in 0.18 ms plain vs 0.29 ms with one (BENCHMARKS.md, Quality)."""
    epochs: int = Field(8, ge=1, le=100)
    """Student epochs."""
    teacher_cross_layers: int = Field(3, ge=1, le=8)
    teacher_deep: tuple[int, ...] = (512, 256, 128)
    teacher_epochs: int = Field(4, ge=1, le=100)
    distill_alpha: float = Field(0.9, ge=0.0, le=1.0)
    """Weight of matching the teacher's logits in the student's loss (0: labels only)."""
    distill_top_weight: float = Field(3.0, ge=0.0, le=100.0)
    """Rows among the teacher's top 5% logits weigh 1 + this in the matching loss."""
    distill_list_weight: float = Field(20.0, ge=0.0, le=1000.0)
    """Weight of the listwise term: KL from the teacher's softmax over each user's
    candidates to the student's (0: none, batches of random rows)."""
    seed: int = 0
    online_store: OnlineStoreConfig = SqliteStoreConfig()
    feast_project: str = Field("sieve", pattern=r"^[a-z][a-z0-9_]*$")


class SieveConfig(Frozen):
    """Everything ``sieve`` reads from ``sieve.toml``; each section is optional."""

    build: BuildConfig = BuildConfig()
    candidate: CandidateConfig = CandidateConfig()
    ranker: RankerConfig = RankerConfig()
    logging: LoggingConfig = LoggingConfig()
    """How ``sieve serve`` logs (``sieve/logs.py``): text or JSON lines, sampled
    request lines, user ids hashed."""


def load_config(path: Path | None) -> SieveConfig:
    """Read a TOML file into a ``SieveConfig``; no file means the defaults.

    Raises:
        pydantic.ValidationError: an unknown key or an out-of-range value; the
            message names the key.
        tomllib.TOMLDecodeError: the file is not TOML.
        ConfigError: the file is not UTF-8, or nests values too deeply to read.
    """
    if path is None:
        return SieveConfig()
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path} nests values too deeply to be a sieve config") from None
    return SieveConfig.model_validate(data)
