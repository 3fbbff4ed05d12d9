"""What every sieve gRPC server has: health checking, reflection, graceful stop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    """A ``grpc.aio`` server whose health starts NOT_SERVING until ``ready()``."""

    def __init__(self, service_name: str, host: str, port: int) -> None:
        self.service_name = service_name
        self.server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 << 20)]
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._address = f"{host}:{port}"
        self.port = 0

    async def start(self) -> int:
        """Bind, start, and report NOT_SERVING; returns the bound port."""
        reflection.enable_server_reflection(
            (self.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
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

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING to health checks, then let in-flight RPCs finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
