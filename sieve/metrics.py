"""Prometheus metrics of a sieve process, served on ``/metrics`` when configured.

One registry per process (prometheus_client's default); every ranker in the
process adds to the same series.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, start_http_server

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

# Every series exists from the start (at 0), so a rate() over it is defined.
for _outcome in ("full", "degraded", "shed", "invalid", "error"):
    RANK_ANSWERS.labels(_outcome)


def serve_metrics(host: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread;
    ``server.server_port`` is the bound port, ``server.shutdown()`` stops it."""
    server, _ = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
