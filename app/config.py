"""``sieve.toml``: the offline build's configuration, and every section assembled
into ``SieveConfig`` from the models each stage keeps beside its code."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import Field

from candidate.config import CandidateConfig
from features.config import OnlineStoreConfig, SqliteStoreConfig
from ranker.config import RankerConfig
from sieve.config import Frozen
from sieve.errors import ConfigError


class BuildConfig(Frozen):
    """The offline jobs of ``sieve build``."""

    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of each user's latest ratings held out for evaluation (at least one
    rating is held out and at least one kept for training)."""
    positive_rating: float = Field(4.0, ge=0.5, le=5.0)
    """A rating at or above this is a positive interaction."""
    top_tags: int = Field(3, ge=0, le=20)
    """How many of an item's most frequent tags go into its text."""
    embedding_batch_size: int = Field(64, ge=1, le=4096)
    index_factory: str = "auto"
    """Faiss ``index_factory`` string, inner-product metric (e.g. ``IVF4096,SQ8``), or
    ``auto``: exact ``Flat`` below 200k items, the measured IVF default above."""
    search_params: str = "auto"
    """Faiss ParameterSpace syntax, e.g. ``nprobe=128`` or ``nprobe=64,k_factor=4``
    (keys: nprobe, k_factor, efSearch); ``auto`` goes with ``index_factory``."""
    train_size: int = Field(200_000, ge=1_000)
    """Rows sampled (seeded) to train the index's quantizers."""
    label_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of each user's latest training ratings that label the ranker's
    training rows (the earlier part gives their features and candidates)."""
    train_users: int = Field(1000, ge=1)
    """At most this many users (seeded sample) give the ranker's training rows."""
    train_candidates: int = Field(1000, ge=1, le=2048)
    """ANN candidates per training user, as the ranker retrieves them."""
    popular_candidates: int = Field(200, ge=0, le=2048)
    """Most popular unseen items added to the ANN candidates (training and serving:
    the manifest carries it to the ranker)."""
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
