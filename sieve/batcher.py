"""A dynamic micro-batcher: concurrent calls go through one function call.

The shape follows Ray Serve's ``serve/batching.py``: a private queue behind one
public entry point (``submit``); knobs validated when created, Ray Serve's
``max_concurrent_batches`` among them; a batch failure is passed to every
waiting caller; the output count is checked against the input count; ``stop()``
ends it explicitly and fails whatever still waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sieve.errors import NotReady, Overloaded

In = TypeVar("In")
Out = TypeVar("Out")
K = TypeVar("K")

TIMER_RESOLUTION_S = 1e-3
"""Shorter waits for a batch to fill are spent yielding to the event loop rather
than on a timer, which the loop's selector rounds up to whole milliseconds."""


def per_group(items: list[tuple[K, In]], fn: Callable[[K, list[In]], list[Out]]) -> list[Out]:
    """``fn(key, inputs)`` once per distinct key (by identity), outputs back in the
    order of ``items``. A batch that spans a swap of the model or index a request
    took (its key) thus never serves one request from another's."""
    groups: dict[int, list[int]] = {}
    for i, (key, _) in enumerate(items):
        groups.setdefault(id(key), []).append(i)
    out: list[Any] = [None] * len(items)
    for idx in groups.values():
        key = items[idx[0]][0]
        results = fn(key, [items[i][1] for i in idx])
        if len(results) != len(idx):
            raise RuntimeError(f"{len(results)} outputs for {len(idx)} inputs")
        for i, res in zip(idx, results, strict=True):
            out[i] = res
    return out


class MicroBatcher(Generic[In, Out]):
    """Collect up to ``max_batch`` inputs, waiting at most ``max_wait_us`` after the
    first, and run ``fn(inputs) -> outputs`` on them in a worker thread.

    Args:
        fn: takes a list of inputs and returns one output per input, in order.
            With ``max_concurrent_batches`` above 1 it runs on several threads
            at once, so it must be thread-safe (an ONNX Runtime session's ``run``
            is).
        max_batch: most inputs per call (>= 1).
        max_wait_us: longest wait for a batch to fill after its first input (>= 0).
        max_queue: inputs that may wait; past it ``submit`` raises ``Overloaded``.
        max_concurrent_batches: batches computed at once (>= 1). The next batch
            is collected only once one of these slots is free, so inputs that
            arrive while every slot is busy join one batch instead of queueing
            behind it one by one. On a CPU, two one-thread calls on two cores
            finish sooner than one call on twice the rows.
    """

    def __init__(
        self,
        fn: Callable[[list[In]], list[Out]],
        max_batch: int,
        max_wait_us: int,
        max_queue: int,
        max_concurrent_batches: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_us < 0:
            raise ValueError(f"max_wait_us must be >= 0, got {max_wait_us}")
        if max_queue < max_batch:
            raise ValueError(f"max_queue ({max_queue}) must be >= max_batch ({max_batch})")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        self._fn = fn
        self.max_concurrent_batches = max_concurrent_batches
        self.max_batch = max_batch
        self.max_wait_s = max_wait_us / 1e6
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[Out]]] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None
        # The batch being collected: stop() must answer these callers too, and
        # those of the batches being computed.
        self._current: list[tuple[In, asyncio.Future[Out]]] = []
        self._computing: dict[asyncio.Task[None], list[tuple[In, asyncio.Future[Out]]]] = {}
        self.batch_sizes: list[int] = []  # for measurement; bounded below
        self.max_recorded = 100_000

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def submit(self, item: In) -> Out:
        """The output for ``item``, computed in some batch.

        Raises:
            Overloaded: the queue is full.
            NotReady: the batcher is not running.
            Whatever ``fn`` raised for the batch ``item`` was in.
        """
        if self._task is None or self._task.done():
            raise NotReady("the batcher is not running")
        fut: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, fut))
        except asyncio.QueueFull:
            raise Overloaded(
                f"{self._queue.maxsize} requests already wait for a batch; retry later"
            ) from None
        return await fut

    async def _next_batch(self) -> list[tuple[In, asyncio.Future[Out]]]:
        batch = self._current = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if left < TIMER_RESOLUTION_S:
                # asyncio sleeps at least 1 ms when it has nothing else to do
                # (epoll_wait takes whole milliseconds, rounded up), so a 200 us
                # wait would cost 1 ms or more: yield to the loop instead, which
                # lets other callers submit, until the deadline passes.
                await asyncio.sleep(0)
                continue
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.max_concurrent_batches)
        while True:
            await slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                slots.release()
                raise
            self._current = []
            live = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled
            if not live:
                slots.release()
                continue
            if len(self.batch_sizes) < self.max_recorded:
                self.batch_sizes.append(len(live))
            task = asyncio.create_task(self._compute(live))
            self._computing[task] = live
            # Not kept past the batch: a finished batch's inputs (an old artifact
            # set among them) must not stay alive while the next one is awaited.
            del batch, live

            def done(t: asyncio.Task[None]) -> None:
                self._computing.pop(t, None)
                slots.release()

            task.add_done_callback(done)

    async def _compute(self, live: list[tuple[In, asyncio.Future[Out]]]) -> None:
        inputs = [item for item, _ in live]
        try:
            outputs = await asyncio.to_thread(self._fn, inputs)
            if len(outputs) != len(inputs):
                raise RuntimeError(
                    f"batch function returned {len(outputs)} outputs for {len(inputs)} inputs"
                )
        except Exception as e:  # every waiting caller gets the batch's failure
            # Without its traceback: its frames hold the batch's inputs (an old
            # artifact set among them) for as long as a caller keeps the error.
            e = e.with_traceback(None)
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, fut), out in zip(live, outputs, strict=True):
            if not fut.done():
                fut.set_result(out)

    async def stop(self) -> None:
        """Stop batching; callers still waiting get ``NotReady``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        waiting = self._current
        self._current = []
        for task, live in list(self._computing.items()):
            task.cancel()  # the thread finishes on its own; its answers are dropped
            waiting.extend(live)
        self._computing.clear()
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for _, fut in waiting:
            if not fut.done():
                fut.set_exception(NotReady("the service is shutting down"))
