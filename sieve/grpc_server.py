"""What every sieve gRPC server has: health checking, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sieve.tls import ServerTls, server_credentials

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def add_servicer(server: grpc.aio.Server, servicer: object, pb2: ModuleType, service: str) -> None:
    """Register ``servicer``'s unary methods for ``service`` (a name in ``pb2``),
    decoding each request here rather than in gRPC: bytes that are not a valid
    request answer INVALID_ARGUMENT naming the message type (gRPC's own decoding
    answers UNKNOWN), and the servicer sees only decoded messages."""
    descriptor = pb2.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_cls = getattr(pb2, method.input_type.name)
        response_cls = getattr(pb2, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _decoding(getattr(servicer, method.name), request_cls),
            request_deserializer=None,  # raw bytes
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
    )


def _decoding(
    method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], request_cls: Any
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
    name = request_cls.DESCRIPTOR.full_name

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = request_cls.FromString(raw)
        except DecodeError as e:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {name}: {e}"
            )
        return await method(request, context)

    return handle


class Server:
    """A ``grpc.aio`` server whose health starts NOT_SERVING until ``ready()``."""

    def __init__(
        self,
        service_name: str,
        host: str,
        port: int,
        max_concurrent_rpcs: int | None = None,
        max_connection_age_s: float = 0.0,
        grace_s: float = 5.0,
        tls: ServerTls | None = None,
        guarded: tuple[Any, Any, str] | None = None,
    ) -> None:
        """``max_concurrent_rpcs``: gRPC's own bound on RPCs accepted and not yet
        answered, those waiting for the event loop included; past it gRPC answers
        RESOURCE_EXHAUSTED without running any Python (None: no bound).
        ``max_connection_age_s``: connections older than this are closed (GOAWAY;
        calls on them get ``grace_s`` to finish), so clients re-resolve; 0: never.
        ``tls``: serve TLS (or mutual TLS) with certificates that rotate
        (``sieve/tls.py``); None or not enabled: plaintext.
        ``guarded``: (auth config, rate-limit config, the service's metric label):
        tokens and per-caller limits by ``guard``, the limiter closed on stop.

        No SO_REUSEPORT: a second server on a port in use fails to start instead
        of silently sharing it (replicas take a port each: app/workers.py)."""
        self.service_name = service_name
        options: list[tuple[str, int]] = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 8 << 20),
        ]
        if max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
            ]
        interceptors, limiter = guard(*guarded) if guarded is not None else ((), None)
        self.server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            interceptors=interceptors or None,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._address = f"{host}:{port}"
        self._host = host
        self._tls = tls
        self.port = 0
        self.metrics_port = -1  # /metrics over HTTP, where the service serves it
        self._stopped = False
        self._jobs: list[tuple[float, Callable[[], Awaitable[object]], str]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        if limiter is not None:
            self.on_stop(limiter.close)

    def serve_metrics(self, port: int) -> None:
        """Serve Prometheus ``/metrics`` on ``port`` of this server's host (0: a free
        one; -1: none) until the server stops; ``metrics_port`` is the bound port."""
        if port < 0:
            return
        from sieve.metrics import serve_metrics

        metrics = serve_metrics(self._host, port)
        self.metrics_port = metrics.server_port

        async def stop_metrics() -> None:
            metrics.shutdown()
            metrics.server_close()

        self.on_stop(stop_metrics)

    def every(self, seconds: float, job: Callable[[], Awaitable[object]], what: str) -> None:
        """Run ``job`` every ``seconds`` while SERVING; a failure is logged, not fatal."""
        if seconds > 0:
            self._jobs.append((seconds, job, what))

    def on_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` after the server has stopped (close clients, release files)."""
        self._on_stop.append(hook)

    @staticmethod
    async def _periodic(seconds: float, job: Callable[[], Awaitable[object]], what: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception:
                log.exception("%s failed; keeping the current state", what)

    async def start(self) -> int:
        """Bind, start, and report NOT_SERVING; returns the bound port."""
        reflection.enable_server_reflection(
            (self.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        if self._tls is not None and self._tls.enabled:
            creds = server_credentials(self._tls)
            self.port = self.server.add_secure_port(self._address, creds)
        else:
            self.port = self.server.add_insecure_port(self._address)
        if self.port == 0:
            raise OSError(f"cannot bind {self._address}")
        for name in ("", self.service_name):
            await self.health.set(name, NOT_SERVING)
        await self.server.start()
        return self.port

    async def start_serving(self, load: Callable[[], Awaitable[None]]) -> int:
        """Start NOT_SERVING, run ``load`` (artifacts, warm-up), then SERVING.

        Raises:
            Whatever ``load`` raised (e.g. ArtifactError); the server is stopped first.
        """
        port = await self.start()
        try:
            await load()
        except BaseException:
            await self.stop(0)
            raise
        await self.ready()
        return port

    async def ready(self) -> None:
        for name in ("", self.service_name):
            await self.health.set(name, SERVING)
        self._tasks = [asyncio.create_task(self._periodic(*job)) for job in self._jobs]

    async def stop(self, grace_s: float, drain_s: float = 0.0) -> None:
        """Stop periodic jobs and report NOT_SERVING; keep answering for ``drain_s``
        (load balancers watching health stop sending meanwhile); then refuse new
        RPCs, give in-flight ones ``grace_s`` to finish, and run the stop hooks.
        A second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            await asyncio.sleep(drain_s)
        await self.server.stop(grace_s)
        for hook in self._on_stop:
            await hook()


ROUND_ROBIN: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
"""Client service config: every call to the next ready address the resolver gave
(``ipv4:A,B`` lists, ``dns:///`` names with several records), not all calls to
the first (gRPC's default, ``pick_first``)."""


def client_options(service_config: dict[str, object] | None = None) -> list[tuple[str, object]]:
    """Channel options of our clients: ``round_robin`` over the addresses the target
    resolves to, merged into ``service_config`` (e.g. a retry policy)."""
    return [("grpc.service_config", json.dumps({**ROUND_ROBIN, **(service_config or {})}))]


def guard(
    auth: Any, rate_limit: Any, service: str
) -> tuple[tuple[grpc.aio.ServerInterceptor, ...], Any]:
    """The interceptors a service's ``auth`` and ``rate_limit`` config ask for, and
    the rate limiter to close on stop (None: no limits)."""
    from sieve.auth import GuardInterceptor
    from sieve.ratelimit import RateLimiter

    limiter = RateLimiter(rate_limit) if rate_limit.enabled else None
    if not auth.required and limiter is None:
        return (), None
    return (GuardInterceptor(auth, (limiter,) if limiter else (), service),), limiter
