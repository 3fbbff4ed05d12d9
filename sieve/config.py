"""Typed, frozen configuration: one model per service, loaded once in ``main``.

Every model rejects unknown keys (``extra="forbid"``), so a typo in ``sieve.toml``
fails at start with the key's name instead of being silently ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ranker.rerank import AnyRule, Fatigue, GroupCap, Mmr, Seen
from sieve.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SqliteStoreConfig(_Frozen):
    """Feast's embedded SQLite online store (the default)."""

    type: Literal["sqlite"] = "sqlite"
    path: str = "online_store.db"
    """SQLite file, relative to the artifact set's feature repo."""


class RedisStoreConfig(_Frozen):
    """Feast's Redis online store (production)."""

    type: Literal["redis"] = "redis"
    connection_string: str = "127.0.0.1:6379"
    """``host:port[,db=N,password=...]`` in Feast's own format."""


OnlineStoreConfig = Annotated[SqliteStoreConfig | RedisStoreConfig, Field(discriminator="type")]


class BuildConfig(_Frozen):
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
    """DCN-v2 cross layers beside the student's MLP (0: a plain MLP). With the
    listwise term and the features of time, the plain MLP keeps the teacher's
    NDCG@10 as one cross layer did, at 0.6x of its cost per row (figures in
    ``ranker.train.student_model``)."""
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


class CandidateConfig(_Frozen):
    """The candidate (ANN) service."""

    host: str = "127.0.0.1"
    port: int = Field(50061, ge=0, le=65535)
    """0 picks a free port (tests)."""
    max_k: int = Field(2048, ge=1, le=2048)
    """Largest k a request may ask for (Faiss GPU caps k at 2048)."""
    max_exclude: int = Field(20_000, ge=0)
    """Most excluded ids one request may carry (seen items plus caller's own)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where the index is searched: ``auto`` takes a GPU when Faiss sees one (the
    ``gpu`` extra), ``gpu`` refuses to start without one."""
    gpu_index: Literal["flat", "clone"] = "flat"
    """On a GPU: ``flat`` serves exact search over the set's item embeddings (the
    right answer at a million items), ``clone`` copies the set's own index (IVF,
    for catalogs too large for brute force; fast-scan PQ does not clone)."""
    gpu_id: int = Field(0, ge=0)
    batching: Literal["auto", "on", "off"] = "auto"
    """Micro-batch concurrent Retrieve calls into one search: ``auto`` is on with a
    GPU and off on a CPU, where concurrency across requests already uses the
    cores (see benchmarks/results/retrieve_batching.json)."""
    batch_max_size: int = Field(32, ge=1, le=1024)
    batch_max_wait_us: int = Field(300, ge=0, le=100_000)
    """Longest wait for a batch to fill after its first request."""
    batch_max_queue: int = Field(4096, ge=1)
    """Requests that may wait for a batch; past it Retrieve answers RESOURCE_EXHAUSTED."""
    batch_exclude_slack: int = Field(512, ge=0)
    """Requests with more excluded ids than this are searched alone (selector inside)."""
    reload_check_s: float = Field(5.0, ge=0.0)
    """How often to look for a new artifact set in ``CURRENT`` (0: never)."""
    keep_versions: int = Field(2, ge=1, le=4)
    """Artifact sets held in memory: the live one and the ones before it, newest
    first. Requests pinned to a held version (the ranker pins the one it serves
    with) are answered from it, so a ranker still on the previous set keeps
    working while it loads the new one. 1 drops the old set at the swap: a ranker
    still on it answers popular items (``retrieve_failed``) until it swaps too."""
    index_mmap: bool = False
    """Memory-map the index where its type allows instead of reading it into
    memory. At 1M items (IVF4096,PQ192x4fs,Refine(SQ8), file in the page cache)
    both load in about 0.5 s, and mapped search p99 was 11.4 ms against 6.7 ms:
    every first touch of a page is a fault. Worth it only for an index larger
    than memory can hold per process."""
    omp_threads: int = Field(1, ge=1)
    """Faiss OpenMP threads; concurrency across requests is the better use of cores."""
    search_threads: int = Field(1, ge=1, le=256)
    """Worker threads that run searches (CPU, batching off); Faiss releases the GIL,
    so n of them search n requests at once and queue the rest. On this 2-core box,
    with the ranker, Redis and a load generator beside it, 1 gave Rank p99 65.7
    and 61.2 ms at 100/s against 107.9 and 101.2 ms with 6 (asyncio's default
    pool here), interleaved runs of 30 s: parallel searches took the core the
    ranker's event loop needed. Raise it on a machine with cores to spare."""
    grace_s: float = Field(5.0, ge=0.0)
    """Time in-flight RPCs get to finish on shutdown."""
    drain_s: float = Field(1.0, ge=0.0)
    """On SIGTERM, health reports NOT_SERVING this long before new RPCs are refused
    (so load balancers that watch health stop sending first)."""


class HistoryConfig(_Frozen):
    """What each user was shown recently (the fatigue rule reads it)."""

    store: Literal["memory", "redis"] = "memory"
    """``memory``: in process (embedded default; one replica, lost on restart);
    ``redis``: shared by every replica."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("sieve:shown", min_length=1)
    ttl_s: float = Field(1800.0, gt=0.0)
    """Items shown longer ago than this no longer count."""
    max_items: int = Field(500, ge=1, le=100_000)
    """Most recent items kept per user."""
    max_users: int = Field(100_000, ge=1)
    """``memory`` only: users kept (least recently served go first)."""
    timeout_s: float = Field(0.05, gt=0.0, le=5.0)
    """``redis`` only: socket timeout; a read or write past it (or Redis down)
    leaves fatigue without history for that request (``history_unavailable``)."""


def _default_rules() -> tuple[AnyRule, ...]:
    # MMR 0.5 + at most 5 per primary genre: genre ILD@50 x1.21 and embedding
    # ILD@50 x1.04 at NDCG@10 x1.01 [0.98, 1.04] (benchmarks/results/quality.json)
    return (Seen(), Fatigue(), Mmr(lambda_=0.5), GroupCap(cap=5))


class RerankConfig(_Frozen):
    """The re-rank rule chain, run in order over the scored candidates
    (see ranker/rerank.py for each rule and its parameters)."""

    rules: tuple[AnyRule, ...] = Field(default_factory=_default_rules)
    """e.g. ``rules = [{name = "seen"}, {name = "mmr", lambda = 0.7, pool = 200}]``."""
    history: HistoryConfig = HistoryConfig()


class StageBudgetMs(_Frozen):
    """Per-stage p99 budget of one Rank, in ms (../shared/DESIGN.md)."""

    user_features: float = Field(3.0, gt=0.0)
    """Parse, validate and read the user's features."""
    retrieve: float = Field(10.0, gt=0.0)
    """The candidate RPC, ANN search and seen-item filter included."""
    item_features: float = Field(6.0, gt=0.0)
    score: float = Field(10.0, gt=0.0)
    rerank: float = Field(3.0, gt=0.0)
    hops: float = Field(3.0, ge=0.0)
    """Serialisation and network: kept back from the caller's deadline."""
    headroom: float = Field(15.0, ge=0.0)
    """Shared by every stage: a stage may run past its own line into what is left
    of it, and a stage that finishes early leaves its unused time to the next."""


class BreakerConfig(_Frozen):
    """A circuit breaker around one dependency (the candidate RPC, Redis reads)."""

    failures: int = Field(5, ge=1)
    """Consecutive failures (errors or overruns) that open it."""
    open_s: float = Field(1.0, gt=0.0)
    """While open, calls skip the dependency; after this, one probe call is let
    through (half-open): success closes the breaker, failure opens it again."""


class ResponseCacheConfig(_Frozen):
    """Each user's last full-quality answer: the ladder's rung before popular items."""

    store: Literal["off", "memory", "redis"] = "memory"
    """``memory``: in process (embedded default); ``redis``: shared by replicas."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("sieve:resp", min_length=1)
    ttl_s: float = Field(600.0, gt=0.0)
    """An answer older than this is not served. Keys carry the artifact version,
    so a new set never serves answers of the old one."""
    max_users: int = Field(100_000, ge=1)
    """``memory`` only: users kept (least recently answered go first)."""
    timeout_s: float = Field(0.02, gt=0.0, le=5.0)
    """``redis`` only: socket timeout of a read or write."""


class ReliabilityConfig(_Frozen):
    """Deadlines, the degradation ladder, breakers, retries and load shedding.

    A stage that overruns takes the next rung instead of failing the request:
    fewer candidates, cached user features, ANN order instead of the model, the
    user's last good answer, popular items. Each answer lists its rungs."""

    budget_ms: StageBudgetMs = StageBudgetMs()
    max_in_flight: int = Field(32, ge=1)
    """Rank calls being served at once; past it Rank answers RESOURCE_EXHAUSTED at
    once, so the accepted ones keep their latency."""
    max_accepted: int | None = Field(None, ge=2)
    """RPCs gRPC holds at once, those still waiting for the event loop included
    (health checks count too); past it gRPC's own limiter answers
    RESOURCE_EXHAUSTED as a call arrives, before its message is read or any
    handler runs. ``max_in_flight`` cannot see calls queued in front of a
    saturated loop; this bound can. None: ``max_in_flight + 1`` (room for a
    health check), so calls past the Rank bound take gRPC's shorter way out: at
    3x this box's maximum, 4 in flight and 5 held shed at p99 25.3 and 18.4 ms
    against 37.3 and 36.1 ms with 8 held (two interleaved runs each)."""

    @property
    def accepted_bound(self) -> int:
        """``max_accepted``, or its default."""
        return self.max_accepted if self.max_accepted is not None else self.max_in_flight + 1

    @model_validator(mode="after")
    def _accepted_above_in_flight(self) -> ReliabilityConfig:
        if self.accepted_bound <= self.max_in_flight:
            raise ValueError(
                f"max_accepted ({self.max_accepted}) must be above max_in_flight "
                f"({self.max_in_flight}): the Rank bound never sheds below gRPC's"
            )
        return self

    cpu_threads: int = Field(1, ge=0, le=64)
    """Threads that run a Rank's CPU work (model inputs and CPU scoring in one
    trip, the re-rank in another) off the event loop, so the loop only takes
    calls, sheds them and moves bytes; 0 runs it all on the loop. One is the
    default: two contend with the loop for the GIL (BENCHMARKS.md, "Shedding")."""
    degraded_candidates: int = Field(200, ge=1, le=2048)
    """The ``fewer_candidates`` rung: candidates kept (best ANN scores) when
    retrieval left under 1.5x the item-feature and score lines before the score
    stage's deadline."""
    redis_retries: int = Field(1, ge=0, le=5)
    """Retries of a failed user-feature read (exponential backoff with jitter,
    within the stage's deadline); reads are idempotent, writes are not retried."""
    retrieve_retries: int = Field(1, ge=0, le=4)
    """Retries of a Retrieve that failed UNAVAILABLE (gRPC's own retry policy,
    exponential backoff with jitter, within the stage's deadline)."""
    breaker: BreakerConfig = BreakerConfig()
    redis_pool_size: int = Field(64, ge=1, le=10_000)
    """Connections of the online-store reader's pool: a bulkhead, so a slow Redis
    holds at most this many; a read that finds none free waits up to
    ``redis_timeout_s`` and then degrades."""
    redis_timeout_s: float = Field(0.25, gt=0.0, le=10.0)
    """Connect and read timeout of the online-store reader's sockets (requests are
    bounded sooner by their stage deadline)."""
    user_cache_size: int = Field(10_000, ge=0)
    """Users whose last read features are kept in process (a few KB each: the
    vector and the seen items), served when the online store fails or overruns
    (``cached_user_features``); 0 turns it off."""
    user_cache_ttl_s: float = Field(300.0, gt=0.0)
    response_cache: ResponseCacheConfig = ResponseCacheConfig()
    metrics_port: int = Field(-1, ge=-1, le=65535)
    """Prometheus ``/metrics`` over HTTP on this port (0: a free one; -1: off)."""


class RankerConfig(_Frozen):
    """The ranker (entry point) service."""

    host: str = "127.0.0.1"
    port: int = Field(50062, ge=0, le=65535)
    candidate_address: str = "127.0.0.1:50061"
    num_candidates: int = Field(1000, ge=1, le=2048)
    default_k: int = Field(50, ge=1)
    max_k: int = Field(500, ge=1)
    max_exclude: int = Field(10_000, ge=0)
    rerank: RerankConfig = RerankConfig()
    model: Literal["fp32", "int8"] = "fp32"
    """Which student to serve: FP32, or its INT8 twin (1.3x cheaper per 1000 rows
    on this CPU, 0.99 of FP32's NDCG@10 in benchmarks/results/quality.json)."""
    intra_op_threads: int = Field(1, ge=1)
    """ONNX Runtime threads per call (1 is right under concurrency on a CPU)."""
    score_batching: Literal["auto", "on", "off"] = "auto"
    """Score the rows of concurrent Rank calls in one ONNX Runtime call: ``auto`` is
    on when ONNX Runtime has the CUDA provider and off on a CPU, where one
    4000-row call costs about four 1000-row calls
    (benchmarks/results/score_batching.json)."""
    score_batch_max_requests: int = Field(32, ge=1, le=1024)
    """Most Rank calls (of ~1000 rows each) scored in one call."""
    score_batch_max_wait_us: int = Field(200, ge=0, le=100_000)
    score_batch_max_queue: int = Field(1024, ge=1)
    """Rank calls that may wait for scoring; past it Rank answers RESOURCE_EXHAUSTED."""
    score_batch_concurrency: int = Field(1, ge=1, le=64)
    """Batches scored at once, each on its own thread (Ray Serve's
    ``max_concurrent_batches``, Triton's instance count). The next batch is
    formed when a slot frees, from whatever waited meanwhile."""
    retrieve_timeout_s: float = Field(1.0, gt=0.0)
    """Longest Retrieve call of the artifact-reload probe (requests use the
    stage deadline of ``reliability.budget_ms``)."""
    item_refresh_s: float = Field(30.0, ge=0.0)
    """How often to check for a new materialization of item features (0: never)."""
    item_load_process_min_items: int = Field(100_000, ge=0)
    """Catalogs of at least this many items are read from the online store into the
    in-process item table by a child process at low CPU priority, so a load beside
    live requests (a new artifact set, a new materialization) does not hold this
    process's event loop: at 1M items the read takes about 30 s of CPU. Smaller
    catalogs are read in process (a child costs about a second to start)."""
    reload_check_s: float = Field(5.0, ge=0.0)
    """How often to look for a new artifact set in ``CURRENT`` (0: never). A new set
    is loaded beside the live one and goes live once the candidate service holds
    it too, so index, model and features change as one unit."""
    grace_s: float = Field(5.0, ge=0.0)
    """Time in-flight Rank calls get to finish on shutdown."""
    drain_s: float = Field(1.0, ge=0.0)
    """On SIGTERM, health reports NOT_SERVING this long before new RPCs are refused."""
    reliability: ReliabilityConfig = ReliabilityConfig()


class SieveConfig(_Frozen):
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
