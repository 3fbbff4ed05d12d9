"""The ranker's client of the candidate service: one channel, gRPC's own retries,
a circuit breaker, and every Retrieve pinned to the artifact version of the set
the request took, so index, model and features always belong together."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig
from ranker.ladder import retrieve_starved
from ranker.resilience import Breaker
from sieve.auth import TokenFile
from sieve.grpc_server import client_options
from sieve.logs import REQUEST_ID, REQUEST_ID_KEY
from sieve.tls import channel_credentials as tls_credentials
from sieve.tls import channel_options as tls_options
from sieve.tracing import Tracer

log = logging.getLogger(__name__)
LATE_NOTICE_S = 0.002
"""A deadline noticed this much (or a fifth of the timeout) after it passed: the
ranker's event loop was busy, not the candidate service slow."""
FAIR_ALONGSIDE = 4
"""A Retrieve sent while more of this ranker's own were out waits behind them at a
candidate service with a few search threads: its deadline is ours to answer for."""


def channel_options(retries: int) -> list[tuple[str, object]]:
    """Channel options for the candidate service: gRPC's own retry policy for
    Retrieve (UNAVAILABLE only, exponential backoff with jitter, never past the
    call's deadline), and reconnects within a second of the service coming back
    (gRPC's default backoff grows to two minutes)."""
    options: list[tuple[str, object]] = [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # (not grpc.min_reconnect_backoff_ms: it is also the connect timeout, and a
        # handshake slower than it would fail)
    ]
    config: dict[str, object] = {}
    if retries > 0:
        policy = {
            "maxAttempts": retries + 1,
            "initialBackoff": "0.002s",
            "maxBackoff": "0.02s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        service = sieve_pb2.DESCRIPTOR.services_by_name["CandidateService"].full_name
        config = {"methodConfig": [{"name": [{"service": service}], "retryPolicy": policy}]}
        options.append(("grpc.enable_retries", 1))
    # round_robin: a candidate_address listing replicas (ipv4:A,B or a dns:/// name
    # with several records) spreads Retrieves over all of them.
    options += client_options(config)
    return options


class CandidateClient:
    """Retrieve from the candidate service behind the ``candidate`` breaker.

    Constructed with the config; ``start()`` opens the channel, ``close()`` closes it.
    """

    def __init__(
        self,
        config: RankerConfig,
        congested: Callable[[], bool] = lambda: False,
        address: str | None = None,
        name: str = "candidate",
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.address = config.candidate_address if address is None else address
        self._congested = congested
        self.in_flight = 0  # Retrieves this ranker has out now
        rel = config.reliability
        self.breaker = Breaker.reported(name, rel.breaker)
        self._channel: grpc.aio.Channel | None = None
        self._stub: sieve_pb2_grpc.CandidateServiceStub | None = None
        self._token = TokenFile(config.candidate_token_file)
        self._tracer = tracer

    def start(self) -> None:
        options = channel_options(self.config.reliability.retrieve_retries)
        tls = self.config.candidate_tls
        if tls.enabled:
            self._channel = grpc.aio.secure_channel(
                self.address,
                tls_credentials(tls),
                options=options + tls_options(tls),
            )
        else:
            self._channel = grpc.aio.insecure_channel(self.address, options=options)
        self._stub = sieve_pb2_grpc.CandidateServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def retrieve(
        self,
        version: str,
        vector: np.ndarray,
        exclude: np.ndarray,
        timeout_s: float,
        k: int,
        source: str = "",
        more: Sequence[tuple[str, np.ndarray, int]] = (),
    ) -> tuple[sieve_pb2.RetrieveResponse | None, str]:
        """``k`` candidates from the ``source`` space ("": the learned one) of
        ``version``, or None and why not (breaker open, no time left, or the call
        failed). ``more``: (source, vector, k) of other spaces searched in the same
        call (``RetrieveRequest.more``), answered in ``response.more``."""
        breaker = self.breaker
        what = "retrieve_failed" if source in ("", "learned") else f"{source}_source_failed"
        if self._stub is None:
            return None, f"{what}: candidate client not started"
        if not breaker.allow():
            return None, f"{what}: candidate breaker open"
        if timeout_s <= 0:
            return None, f"{what}: no time left for retrieval"
        sent, alongside = time.perf_counter(), self.in_flight
        self.in_flight += 1
        try:
            resp = await self._stub.Retrieve(
                sieve_pb2.RetrieveRequest(
                    user_vector=sieve_pb2.UserVector(values=vector),
                    k=k,
                    exclude_item_ids=exclude,
                    artifact_version=version,  # the index of this request's set
                    source=source,
                    more=[
                        sieve_pb2.SpaceQuery(
                            source=name, user_vector=sieve_pb2.UserVector(values=v), k=n
                        )
                        for name, v, n in more
                    ],
                ),
                timeout=timeout_s,
                metadata=self._metadata(),
            )
        except grpc.aio.AioRpcError as e:
            log.warning(
                "Retrieve (%s) failed: %s %s", source or "learned", e.code().name, e.details()
            )
            why = e.code().name
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._own_fault(
                timeout_s, time.perf_counter() - sent, alongside
            ):
                breaker.inconclusive()
                return None, f"{what}: {why} (given {timeout_s * 1e3:.1f} ms)"
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # e.g. the candidate service restarted and no longer holds our
                # version: the service answers, so the breaker stays as it is
                breaker.success()
                return None, f"{what}: {why} ({e.details()})"
            breaker.failure()
            return None, f"{what}: {why}"
        finally:
            self.in_flight -= 1
        breaker.success()
        return resp, ""

    def _metadata(self) -> list[tuple[str, str]] | None:
        """The token, the Rank's request id (the candidate's log lines carry it too),
        and the current span's ``traceparent`` when tracing is on."""
        md = list(self._token.metadata() or ())
        request_id = REQUEST_ID.get()
        if request_id:
            md.append((REQUEST_ID_KEY, request_id))
        if self._tracer is not None:
            md += self._tracer.inject()
        return md or None

    def _own_fault(self, timeout_s: float, took_s: float, alongside: int) -> bool:
        """Whether a Retrieve past its deadline says more about this process than about
        the candidate service: it was given less than the stage's own budget (this
        request's queueing used the rest), or its deadline was noticed late (this
        event loop was too busy to notice it in time, so it was too busy to read an
        answer in time too), it went out behind more than ``FAIR_ALONGSIDE`` of this
        ranker's own Retrieves (queued behind our own burst), or most of this
        ranker's recent answers ran out of time (it is congested). Such a call
        neither opens nor closes the breaker."""
        starved = retrieve_starved(timeout_s, self.config.reliability)
        late = took_s - timeout_s > max(LATE_NOTICE_S, 0.2 * timeout_s)
        return starved or late or alongside > FAIR_ALONGSIDE or self._congested()

    async def holds(self, version: str, dim: int) -> bool:
        """Whether the candidate service answers a Retrieve pinned to ``version``
        (k=1, a unit vector of dimension ``dim``). FAILED_PRECONDITION: not yet."""
        if self._stub is None:
            return False
        probe = np.zeros(dim, np.float32)
        probe[0] = 1.0
        try:
            resp = await self._stub.Retrieve(
                sieve_pb2.RetrieveRequest(
                    user_vector=sieve_pb2.UserVector(values=probe), k=1, artifact_version=version
                ),
                timeout=self.config.retrieve_timeout_s,
                metadata=self._token.metadata(),
            )
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                log.warning(
                    "candidate probe for %s failed: %s %s", version, e.code().name, e.details()
                )
            return False
        return resp.artifact_version == version
