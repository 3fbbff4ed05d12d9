from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from sieve.batcher import MicroBatcher
from sieve.errors import NotReady, Overloaded


async def test_concurrent_calls_share_batches_and_get_their_own_answers() -> None:
    b: MicroBatcher[int, int] = MicroBatcher(lambda xs: [x * 10 for x in xs], 8, 20_000, 64)
    b.start()
    got = await asyncio.gather(*(b.submit(i) for i in range(20)))
    await b.stop()
    assert got == [i * 10 for i in range(20)]
    assert max(b.batch_sizes) > 1 and sum(b.batch_sizes) == 20
    assert max(b.batch_sizes) <= 8


async def test_a_batch_failure_reaches_every_caller() -> None:
    def boom(xs: list[int]) -> list[int]:
        raise ValueError("model exploded")

    b: MicroBatcher[int, int] = MicroBatcher(boom, 4, 20_000, 16)
    b.start()
    results = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
    await b.stop()
    assert all(isinstance(r, ValueError) and "exploded" in str(r) for r in results)


async def test_output_count_is_checked() -> None:
    b: MicroBatcher[int, int] = MicroBatcher(lambda xs: xs[:-1], 4, 20_000, 16)
    b.start()
    results = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
    await b.stop()
    assert all(isinstance(r, RuntimeError) and "outputs for" in str(r) for r in results)


async def test_full_queue_is_refused_and_stop_fails_waiters() -> None:
    gate = threading.Event()

    def slow(xs: list[int]) -> list[int]:
        gate.wait(10)
        return xs

    b: MicroBatcher[int, int] = MicroBatcher(slow, 1, 0, 2)
    b.start()
    first = asyncio.create_task(b.submit(0))  # taken into the (blocked) batch
    while not b.batch_sizes:
        await asyncio.sleep(0)
    waiting = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="2 requests already wait"):
        await b.submit(3)
    gate.set()
    assert await asyncio.wait_for(first, 10) == 0
    await b.stop()
    # every caller gets an answer: a result, or NotReady for the ones stop() cut off
    for t in waiting:
        with contextlib.suppress(NotReady):
            assert await asyncio.wait_for(t, 10) in (1, 2)


async def test_stop_answers_callers_of_the_batch_in_flight() -> None:
    gate = threading.Event()

    def slow(xs: list[int]) -> list[int]:
        gate.wait(10)
        return xs

    b: MicroBatcher[int, int] = MicroBatcher(slow, 4, 0, 8)
    b.start()
    caller = asyncio.create_task(b.submit(1))
    while not b.batch_sizes:  # the call is inside a batch, blocked in fn
        await asyncio.sleep(0)
    await b.stop()
    with pytest.raises(NotReady, match="shutting down"):
        await asyncio.wait_for(caller, 10)
    gate.set()


async def test_concurrent_batches_overlap_and_the_next_waits_for_a_slot() -> None:
    gates = [threading.Event() for _ in range(3)]
    running: list[list[int]] = []

    def gated(xs: list[int]) -> list[int]:
        running.append(xs)
        gates[xs[0]].wait(10)
        return [x * 10 for x in xs]

    b: MicroBatcher[int, int] = MicroBatcher(gated, 1, 0, 8, max_concurrent_batches=2)
    b.start()
    calls = [asyncio.create_task(b.submit(i)) for i in range(3)]
    for _ in range(1000):  # two batches in fn at once, the third held back
        if len(running) == 2:
            break
        await asyncio.sleep(0.001)
    assert sorted(x for xs in running for x in xs) == [0, 1]
    await asyncio.sleep(0.05)
    assert len(running) == 2, "a third batch started with both slots busy"
    gates[1].set()  # the second finishes first: its caller need not wait for the first
    assert await asyncio.wait_for(calls[1], 10) == 10
    assert not calls[0].done()
    for _ in range(1000):  # its slot went to the third
        if len(running) == 3:
            break
        await asyncio.sleep(0.001)
    assert running[2] == [2]
    gates[0].set()
    gates[2].set()
    assert await asyncio.gather(*calls) == [0, 10, 20]
    await b.stop()


async def test_stop_answers_callers_of_every_batch_in_flight() -> None:
    gate = threading.Event()

    def slow(xs: list[int]) -> list[int]:
        gate.wait(10)
        return xs

    b: MicroBatcher[int, int] = MicroBatcher(slow, 1, 0, 8, max_concurrent_batches=2)
    b.start()
    callers = [asyncio.create_task(b.submit(i)) for i in range(3)]
    while len(b.batch_sizes) < 2:
        await asyncio.sleep(0)
    await b.stop()
    for caller in callers:
        with pytest.raises(NotReady, match="shutting down"):
            await asyncio.wait_for(caller, 10)
    gate.set()


def test_knobs_are_validated() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda xs: xs, 0, 10, 10)
    with pytest.raises(ValueError, match="max_wait_us"):
        MicroBatcher(lambda xs: xs, 1, -1, 10)
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(lambda xs: xs, 8, 10, 4)
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        MicroBatcher(lambda xs: xs, 8, 10, 8, max_concurrent_batches=0)
