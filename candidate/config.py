"""Configuration of the candidate (ANN) service: ``[candidate]`` in ``sieve.toml``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sieve.auth import AuthConfig
from sieve.config import Frozen
from sieve.ratelimit import RateLimitConfig
from sieve.tls import ServerTls
from sieve.tracing import TracingConfig


class CandidateConfig(Frozen):
    """The candidate (ANN) service."""

    host: str = "127.0.0.1"
    port: int = Field(50061, ge=0, le=65535)
    """0 picks a free port (tests)."""
    shard: int = Field(-1, ge=-1, le=255)
    """Serve shard ``shard`` of a sharded set (``[build] shards``; ``sieve serve --only
    candidate --shard i``): its items only, searched in that shard's index files.
    -1: the whole catalog. A set without that shard is refused at load (and the
    service keeps the set it serves)."""
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
    memory: every first touch of a mapped page is a fault, so it is worth it only
    for an index larger than memory can hold per process.
    Search p99 11.4 ms mapped vs 6.7 ms read, at 1M (BENCHMARKS.md, ANN)."""
    omp_threads: int = Field(1, ge=1)
    """Faiss OpenMP threads; concurrency across requests is the better use of cores."""
    search_threads: int = Field(0, ge=0, le=256)
    """Worker threads that run searches (CPU, batching off); 0 (the default) searches
    on the event loop. Faiss releases the GIL, so n threads search n requests at
    once and queue the rest; but on a small box parallel searches take the core the
    ranker's event loop needs, and each hand-off to a thread costs a wake-up.
    Rank p99 at 100/s 65.7 ms with 1 vs 107.9 ms with 6 (BENCHMARKS.md, ANN); on
    the loop, 0.1-0.3 ms less per Retrieve than one thread and fewer rungs
    (BENCHMARKS.md, "Where a Rank's CPU goes"). Raise it on a machine with cores
    to spare."""
    grace_s: float = Field(5.0, ge=0.0)
    """Time in-flight RPCs get to finish on shutdown."""
    drain_s: float = Field(1.0, ge=0.0)
    """On SIGTERM, health reports NOT_SERVING this long before new RPCs are refused
    (so load balancers that watch health stop sending first)."""
    tls: ServerTls = ServerTls()
    """TLS or mutual TLS for this service's port (``sieve/tls.py``); empty: plaintext,
    said loudly at start on an address other than loopback."""
    auth: AuthConfig = AuthConfig()
    """Bearer tokens (API keys, JWTs) required for Retrieve (``sieve/auth.py``);
    off by default. Callers need ``Retrieve`` among their methods."""
    rate_limit: RateLimitConfig = RateLimitConfig()
    """Per-caller token buckets (``sieve/ratelimit.py``); off by default."""
    metrics_port: int = Field(-1, ge=-1, le=65535)
    """Serve Prometheus metrics on ``/metrics`` at this port (0: a free one; -1: none)."""
    tracing: TracingConfig = TracingConfig()
    """OpenTelemetry spans of Retrieve, joined to the ranker's trace through the
    call's ``traceparent`` (``sieve/tracing.py``); off by default."""
    max_connection_age_s: float = Field(300.0, ge=0.0)
    """Clients are asked to reconnect (HTTP/2 GOAWAY, +-10% jitter, in-flight calls
    finish) after a connection is this old, so round_robin clients re-resolve and
    spread over replicas added since; 0: never."""
