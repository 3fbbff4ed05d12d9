"""A loopback TCP proxy that adds latency: the "slow dependency" of the fault suite.

    proxy = DelayProxy("127.0.0.1:50061")   # the real candidate service
    port = await proxy.start()               # point the ranker at 127.0.0.1:port
    proxy.delay_s = 0.1                      # every reply now arrives 100 ms late

Bytes are forwarded unchanged in both directions (gRPC's HTTP/2 passes through
untouched); each chunk from the service is held until ``delay_s`` after it
arrived, in order, so the link gets slower without getting narrower.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class DelayProxy:
    def __init__(self, target: str, host: str = "127.0.0.1") -> None:
        self.target_host, _, port = target.rpartition(":")
        self.target_port = int(port)
        self.host = host
        self.delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> int:
        """Listen on ``port`` (0: a free one); returns the bound port."""
        self._server = await asyncio.start_server(self._accept, self.host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        pipes = [
            asyncio.create_task(self._pipe(reader, up_w, delayed=False)),
            asyncio.create_task(self._pipe(up_r, writer, delayed=True)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_w):
                w.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delayed: bool
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                at, chunk = await queue.get()
                if not chunk:
                    return
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(chunk)
                await dst.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                chunk = await src.read(65536)
                due = time.monotonic() + (self.delay_s if delayed else 0.0)
                queue.put_nowait((due, chunk))
                if not chunk:
                    break
            await sender
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
