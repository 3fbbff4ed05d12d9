"""Prometheus metrics of a sieve process, served on ``/metrics`` when configured.

One registry per process (prometheus_client's default); every ranker in the
process adds to the same series.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

# Importing Feast sets PROMETHEUS_MULTIPROC_DIR to a feast_metrics_* temporary
# folder (feast/metrics.py, for its own Gunicorn feature server), and every process
# started from then on inherits it: prometheus_client then keeps values in mmap
# files there and drops exemplars. sieve serves each process's own metrics, with
# exemplars; a folder the operator set on purpose is left alone.
for _var in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
    if Path(os.environ.get(_var, "")).name.startswith("feast_metrics_"):
        del os.environ[_var]

from prometheus_client import Counter, Gauge, Histogram, start_http_server  # noqa: E402

log = logging.getLogger(__name__)

RANK_ANSWERS = Counter(
    "sieve_rank_answers", "Rank calls by outcome: full, degraded, shed, error", ["outcome"]
)
RANK_RUNGS = Counter(
    "sieve_rank_rungs", "Rank answers that took each rung of the degradation ladder", ["rung"]
)
IN_FLIGHT = Gauge("sieve_rank_in_flight", "Rank calls being served")
IN_FLIGHT_LIMIT = Gauge(
    "sieve_rank_in_flight_limit", "Rank calls the ranker serves at once now (past it: shed)"
)
BREAKER_STATE = Gauge(
    "sieve_breaker_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open", ["dependency"]
)
NONFINITE_FEATURES = Counter(
    "sieve_nonfinite_feature_values",
    "Feature values that were NaN or inf and were scored with the feature's default",
)

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025,
    0.03, 0.035, 0.04, 0.045, 0.05, 0.06, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
"""Seconds: every millisecond-scale step from 0.5 to 50 ms is resolved (the budget's
lines are 3-15 ms, the total 50 ms), coarser past the budget."""
RANK_STAGE_SECONDS = Histogram(
    "sieve_rank_stage_seconds",
    "Server-side time of each Rank stage (validate, user_features, retrieve, "
    "item_features, score, rerank, fallback) and of the whole call (total); "
    "exemplars carry the trace id of sampled calls",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
CALLS_BY_CALLER = Counter(
    "sieve_calls_by_caller",
    "Calls per caller identity (the API key's name, the JWT's subject; 'anonymous' "
    "without auth) and outcome: ok, or the gRPC status of a refusal",
    ["service", "caller", "outcome"],
)
CANDIDATE_SECONDS = Histogram(
    "sieve_candidate_seconds",
    "Candidate service time per Retrieve: the ANN searches (search), the wait for a "
    "search thread or a batch to start (queue) and the whole call (total; the rest is "
    "validation and encoding)",
    ["part"],
    buckets=LATENCY_BUCKETS,
)
EVENTS_RECORDED = Counter(
    "sieve_events_recorded",
    "Events by RecordEvents outcome: accepted (durable in the stream), invalid (the "
    "batch refused), unavailable (the stream's Redis failed; not acknowledged)",
    ["outcome"],
)
ARTIFACT_INFO = Gauge(
    "sieve_artifact_info", "1 for the artifact version a service serves now", ["service", "version"]
)
RELOADS = Counter(
    "sieve_artifact_reloads",
    "Artifact reloads by outcome: swapped, refused",
    ["service", "outcome"],
)

# Every series exists from the start (at 0), so a rate() over it is defined.
for _outcome in ("full", "degraded", "shed", "invalid", "error"):
    RANK_ANSWERS.labels(_outcome)
for _outcome in ("accepted", "invalid", "unavailable"):
    EVENTS_RECORDED.labels(_outcome)
for _part in ("search", "queue", "total"):
    CANDIDATE_SECONDS.labels(_part)
for _stage in ("validate", "user_features", "retrieve", "item_features", "score", "rerank",
               "fallback", "total"):  # fmt: skip
    RANK_STAGE_SECONDS.labels(_stage)


def set_live_version(service: str, version: str, before: str = "") -> None:
    """``sieve_artifact_info{service, version} = 1`` for the live set (0 for ``before``)."""
    if before:
        ARTIFACT_INFO.labels(service, before).set(0)
    ARTIFACT_INFO.labels(service, version).set(1)


@functools.cache
def _trace_api() -> Any:
    """OpenTelemetry's trace API, or None without the ``tracing`` extra (looked up
    once, not on every call)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


def exemplar() -> dict[str, str] | None:
    """``{"trace_id": ...}`` of the current span when it is sampled (tracing on), for
    a histogram observation's exemplar; None otherwise."""
    trace = _trace_api()
    if trace is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return {"trace_id": format(ctx.trace_id, "032x")}


def serve_metrics(host: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread;
    ``server.server_port`` is the bound port, ``server.shutdown()`` stops it."""
    server, _ = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
