"""Configuration of the ranker service: ``[ranker]`` in ``sieve.toml``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from features.events import EventsConfig
from ranker.feature_log import FeatureLogConfig
from ranker.rerank import AnyRule, Fatigue, GroupCap, Mmr, Seen
from sieve.auth import AuthConfig
from sieve.config import Frozen
from sieve.ratelimit import RateLimitConfig
from sieve.tls import ClientTls, ServerTls
from sieve.tracing import TracingConfig


class HistoryConfig(Frozen):
    """What each user was shown recently (the fatigue rule reads it)."""

    store: Literal["memory", "redis"] = "memory"
    """``memory``: in process (embedded default; one replica, lost on restart);
    ``redis``: shared by every replica."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    """``redis_url`` names a node of a Redis Cluster (the others are found). Keys
    carry the user id as a hash tag (``<prefix>:{<user id>}``), so one user's
    shown-history and cached answers sit in one slot, on one node."""
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
    # MMR 0.5 + at most 5 per primary genre: more genre diversity at no
    # measurable NDCG@10 cost. Genre ILD@50 x1.21 at NDCG@10 x1.014 (BENCHMARKS.md, Diversity)
    return (Seen(), Fatigue(), Mmr(lambda_=0.5), GroupCap(cap=5))


class RerankConfig(Frozen):
    """The re-rank rule chain, run in order over the scored candidates
    (see ranker/rerank.py for each rule and its parameters)."""

    rules: tuple[AnyRule, ...] = Field(default_factory=_default_rules)
    """e.g. ``rules = [{name = "seen"}, {name = "mmr", lambda = 0.7, pool = 200}]``."""
    history: HistoryConfig = HistoryConfig()
    diversity_dims: int = Field(32, ge=0, le=4096)
    """The diversity rules (mmr) compare items on the text embeddings' top this-many
    principal directions, computed when a set loads (``ranker.diversity.compact_space``; 1.1 s and
    128 MB at 1M items); 0 compares the full embeddings. At 32 of 384, MMR's
    lists keep 99% of their diversity measured in the full space (BENCHMARKS.md)."""


class StageBudgetMs(Frozen):
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


class BreakerConfig(Frozen):
    """A circuit breaker around one dependency (the candidate RPC, Redis reads)."""

    failures: int = Field(5, ge=1)
    """Consecutive failures (errors or overruns) that open it."""
    open_s: float = Field(1.0, gt=0.0)
    """While open, calls skip the dependency; after this, one probe call is let
    through (half-open): success closes the breaker, failure opens it again."""


class ResponseCacheConfig(Frozen):
    """Each user's last full-quality answer: the ladder's rung before popular items."""

    store: Literal["off", "memory", "redis"] = "memory"
    """``memory``: in process (embedded default); ``redis``: shared by replicas."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    """``redis_url`` names a node of a Redis Cluster (the others are found). Keys
    carry the user id as a hash tag (``<prefix>:{<user id>}``), so one user's
    shown-history and cached answers sit in one slot, on one node."""
    key_prefix: str = Field("sieve:resp", min_length=1)
    ttl_s: float = Field(600.0, gt=0.0)
    """An answer older than this is not served. Keys carry the artifact version,
    so a new set never serves answers of the old one."""
    max_users: int = Field(100_000, ge=1)
    """``memory`` only: users kept (least recently answered go first)."""
    timeout_s: float = Field(0.02, gt=0.0, le=5.0)
    """``redis`` only: socket timeout of a read or write."""


class ReliabilityConfig(Frozen):
    """Deadlines, the degradation ladder, breakers, retries and load shedding.

    A stage that overruns takes the next rung instead of failing the request:
    fewer candidates, cached user features, ANN order instead of the model, the
    user's last good answer, popular items. Each answer lists its rungs."""

    budget_ms: StageBudgetMs = StageBudgetMs()
    max_in_flight: int = Field(32, ge=1)
    """Rank calls being served at once; past it Rank answers RESOURCE_EXHAUSTED at
    once, so the accepted ones keep their latency."""
    adaptive_in_flight: bool = False
    """Learn the in-flight bound from the answers, between ``min_in_flight`` and
    ``max_in_flight`` (``ranker.resilience.InFlightLimit``): answers that run out
    of time lower it, timely ones raise it. Off by default: under a closed-loop
    burst past capacity it sheds and the admitted calls keep full quality (47-54%
    of answers, against 1% with it off), but under open-loop load near capacity
    (100/s at 1M) it refused 4-7% of calls without a clear drop in rungs
    (BENCHMARKS.md, Shedding). Off: always ``max_in_flight``."""
    min_in_flight: int = Field(2, ge=1)
    """The adaptive bound never goes below this."""
    max_accepted: int | None = Field(None, ge=2)
    """RPCs gRPC holds at once, those still waiting for the event loop included
    (health checks count too); past it gRPC's own limiter answers
    RESOURCE_EXHAUSTED as a call arrives, before its message is read or any
    handler runs. ``max_in_flight`` cannot see calls queued in front of a
    saturated loop; this bound can. None: ``max_in_flight + 1`` (room for a
    health check), so calls past the Rank bound take gRPC's shorter way out.
    Shed p99 25.3 ms with 5 held vs 37.3 ms with 8, at 3x (BENCHMARKS.md, Shedding)."""

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

    cpu_threads: int = Field(0, ge=0, le=64)
    """Threads that run a Rank's CPU work (model inputs and CPU scoring in one
    trip, the re-rank in another) off the event loop; 0 (the default) runs it on
    the loop. On the loop a Rank makes no thread hand-off (each a wake-up, 0.2-2 ms
    on an idle core): at 100/s on 1M items 0.5-1.7% of answers took a rung against
    3.5-7.6% with one thread. One thread keeps the loop free to refuse calls under
    overload (refusals twice as fast at 300/s); two contend with the loop for the
    GIL (BENCHMARKS.md, "Shedding" and "Where a Rank's CPU goes")."""
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


class RankerConfig(Frozen):
    """The ranker (entry point) service."""

    host: str = "127.0.0.1"
    port: int = Field(50062, ge=0, le=65535)
    candidate_address: str = "127.0.0.1:50061"
    """The candidate service: ``host:port``, ``ipv4:A,B`` of replicas, or a
    ``dns:///`` name (calls balanced by ``round_robin``)."""
    candidate_shards: tuple[str, ...] = ()
    """A sharded set's candidate shards, one address each in shard order (each as
    ``candidate_address``: a shard may have replicas). Every Retrieve goes to all of
    them at once, each with the stage's deadline, and their top-k are merged by
    score; a shard that fails or is late leaves a ``partial_candidates`` answer with
    its coverage. Empty: ``candidate_address`` serves the whole catalog."""
    default_k: int = Field(50, ge=1)
    max_k: int = Field(500, ge=1)
    max_exclude: int = Field(10_000, ge=0)
    rerank: RerankConfig = RerankConfig()
    model: Literal["fp32", "int8"] = "fp32"
    """Which student to serve: FP32, or its INT8 twin (dynamic quantization; the
    tower's first layer and the output layer stay FP32).
    INT8 / FP32 NDCG@10 1.004, 0.22 vs 0.24 ms per 1000 rows (BENCHMARKS.md, Scoring)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where the ranking model scores: ``auto`` takes CUDA when a test session on it
    answers at start-up (the ``gpu`` extra on a host with an NVIDIA driver) and
    otherwise the CPU, saying why once; ``gpu`` refuses to start without it. The
    user tower (one row) always runs on the CPU."""
    intra_op_threads: int = Field(1, ge=1)
    """ONNX Runtime threads per call (1 is right under concurrency on a CPU)."""
    score_batching: Literal["auto", "on", "off"] = "auto"
    """Score the rows of concurrent Rank calls in one ONNX Runtime call: ``auto`` is
    on when the model scores on CUDA (``device``) and off on a CPU, where one big
    call costs what the calls it replaces cost, so batching only adds the wait.
    One 8000-row call 1.29 ms vs 8 x 0.17 ms (BENCHMARKS.md, Scoring)."""
    score_batch_max_requests: int = Field(32, ge=1, le=1024)
    """Most Rank calls (of ~1000 rows each) scored in one call."""
    score_batch_max_wait_us: int = Field(200, ge=0, le=100_000)
    score_batch_max_queue: int = Field(1024, ge=1)
    """Rank calls that may wait for scoring; past it a Rank is not scored and takes
    the ``ann_order`` rung (ANN order instead of the model)."""
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
    process's event loop. Smaller catalogs are read in process, where starting a
    child would cost more than it saves.
    About 30 s of CPU at 1M items; a child starts in about 1 s (BENCHMARKS.md, Serving)."""
    reload_check_s: float = Field(5.0, ge=0.0)
    """How often to look for a new artifact set in ``CURRENT`` (0: never). A new set
    is loaded beside the live one and goes live once the candidate service holds
    it too, so index, model and features change as one unit."""
    grace_s: float = Field(5.0, ge=0.0)
    """Time in-flight Rank calls get to finish on shutdown."""
    drain_s: float = Field(1.0, ge=0.0)
    """On SIGTERM, health reports NOT_SERVING this long before new RPCs are refused."""
    tls: ServerTls = ServerTls()
    """TLS or mutual TLS for this service's port (``sieve/tls.py``); empty: plaintext,
    said loudly at start on an address other than loopback."""
    candidate_tls: ClientTls = ClientTls()
    """How this ranker reaches the candidate service over TLS (its CA, and a client
    certificate where the candidate requires one); empty: plaintext."""
    candidate_token_file: str = ""
    """A file holding the bearer token (an API key or a JWT) this ranker sends on
    every Retrieve, for a candidate service with ``[candidate.auth]``; re-read
    when the file changes. Empty: none."""
    auth: AuthConfig = AuthConfig()
    """Bearer tokens (API keys, JWTs) required for Rank (``sieve/auth.py``); off by
    default. ``debug`` answers only callers allowed it."""
    rate_limit: RateLimitConfig = RateLimitConfig()
    """Per-caller token buckets (``sieve/ratelimit.py``), shared by replicas through
    Redis with ``store = "redis"``; off by default."""
    feature_log: FeatureLogConfig = FeatureLogConfig()
    """The model rows a sample of Ranks scored, as Parquet (``ranker/feature_log.py``;
    ``sieve skew`` compares them with the training code's); off by default."""
    events: EventsConfig = EventsConfig()
    """The feedback loop: ``RecordEvents`` into a Redis Stream, the events views read
    beside the user's features (``features/events.py``); off by default."""
    tracing: TracingConfig = TracingConfig()
    """OpenTelemetry traces of Rank and its stages (``sieve/tracing.py``, the
    ``tracing`` extra); off by default."""
    max_connection_age_s: float = Field(300.0, ge=0.0)
    """Clients are asked to reconnect (HTTP/2 GOAWAY, +-10% jitter, in-flight calls
    finish) after a connection is this old, so round_robin clients re-resolve and
    spread over replicas added since; 0: never."""
    reliability: ReliabilityConfig = ReliabilityConfig()
