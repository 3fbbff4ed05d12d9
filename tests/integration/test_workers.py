"""``sieve serve --ranker-workers N``: real processes, real Redis, loopback gRPC.

Two ranker workers behind a ``round_robin`` channel over an ``ipv4:`` list: both
answer, they share the shown-history through Redis, a killed worker is restarted
on its port while the other keeps answering, and the in-process history is
refused for more than one worker.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve.grpc_server import client_options
from tests.conftest import sieve_process

HISTORY_DB = 5


def _answered(url: str) -> float:
    """Rank calls a worker answered (full quality or degraded), from its /metrics."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(('sieve_rank_answers_total{outcome="full"} ',
                            'sieve_rank_answers_total{outcome="degraded"} '))
    )  # fmt: skip


def _serving(port: int) -> bool:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        return status.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _rank(port_or_target: str, user: int, k: int = 10) -> list[int]:
    with grpc.insecure_channel(port_or_target, options=client_options()) as ch:
        resp = sieve_pb2_grpc.RankerServiceStub(ch).Rank(
            sieve_pb2.RankRequest(user_id=user, k=k), timeout=10
        )
    assert not resp.rungs, resp.degradations
    return [i.item_id for i in resp.items]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_two_workers_balance_calls_share_history_and_come_back_after_a_crash(
    artifacts_root: Path, redis_server: str, tmp_path: Path
) -> None:
    redis.Redis.from_url(f"redis://{redis_server}/{HISTORY_DB}").flushdb()
    config = tmp_path / "sieve.toml"
    config.write_text(
        "[ranker.rerank.history]\n"
        'store = "redis"\n'
        f'redis_url = "redis://{redis_server}/{HISTORY_DB}"\n'
        "[ranker.reliability]\n"
        "metrics_port = 0\n"
    )
    ready = tmp_path / "ready"
    proc = sieve_process(
        "--config", str(config), "serve", "--artifacts", str(artifacts_root),
        "--candidate-port", "0", "--ranker-port", "0", "--ranker-workers", "2",
        "--ready-file", str(ready),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "workers not ready in 180 s"
            time.sleep(0.1)
        lines = [line.split() for line in ready.read_text().splitlines()]
        assert [line[0] for line in lines] == ["candidate", "ranker", "ranker"], lines
        ports = [int(line[1]) for line in lines[1:]]
        metrics = [f"http://127.0.0.1:{line[3]}/metrics" for line in lines[1:]]
        assert len(set(ports)) == 2

        # The shown-history is shared: the second worker demotes what the first
        # showed (the same user on one worker alone would get the same list twice
        # without a shared history).
        first = _rank(f"127.0.0.1:{ports[0]}", 42)
        second = _rank(f"127.0.0.1:{ports[1]}", 42)
        assert second != first
        keys = redis.Redis.from_url(f"redis://{redis_server}/{HISTORY_DB}").keys("*")
        assert keys, "the shown-history is not in Redis"

        # round_robin over the list: once both connections are up, every call to
        # the next worker.
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        with grpc.insecure_channel(target, options=client_options()) as ch:
            stub = sieve_pb2_grpc.RankerServiceStub(ch)
            start = [_answered(m) for m in metrics]
            for _ in range(50):
                if all(_answered(m) > s for m, s in zip(metrics, start, strict=True)):
                    break
                stub.Rank(sieve_pb2.RankRequest(user_id=3, k=10), timeout=10)
            before = [_answered(m) for m in metrics]
            assert all(b > s for b, s in zip(before, start, strict=True)), "one worker idle"
            for user in range(1, 21):
                resp = stub.Rank(sieve_pb2.RankRequest(user_id=user, k=10), timeout=10)
                assert len(resp.items) == 10
            gained = [_answered(m) - b for m, b in zip(metrics, before, strict=True)]
            assert sorted(gained) == [10, 10], gained

            # A worker killed: the other answers the channel's calls while the
            # supervisor starts a new one on the same port.
            workers = [
                pid for pid in _children(proc.pid)
                if "ranker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            ]  # fmt: skip
            assert len(workers) == 2, workers
            os.kill(workers[0], signal.SIGKILL)
            deadline = time.monotonic() + 5
            answered = 0
            while answered < 10:
                try:
                    stub.Rank(sieve_pb2.RankRequest(user_id=7, k=10), timeout=10)
                    answered += 1
                except grpc.RpcError as e:  # the call that met the dying connection
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    assert time.monotonic() < deadline, "no worker answered for 5 s"
            deadline = time.monotonic() + 120
            while not all(_serving(p) for p in ports):
                assert proc.poll() is None
                assert time.monotonic() < deadline, "the killed worker was not restarted"
                time.sleep(0.5)
        for p in ports:
            assert len(_rank(f"127.0.0.1:{p}", 9)) == 10
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "restarting" in out and "2 ranker workers serving on ipv4:" in out, out
    assert not _children(proc.pid)


def test_more_than_one_worker_refuses_an_in_process_history(
    artifacts_root: Path, tmp_path: Path
) -> None:
    proc = sieve_process(
        "serve", "--artifacts", str(artifacts_root), "--candidate-port", "0",
        "--ranker-port", "0", "--ranker-workers", "2",
    )  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert 'store = "redis"' in out and "fatigue" in out, out


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_a_worker_count_below_one_is_refused(artifacts_root: Path, workers: str) -> None:
    proc = sieve_process("serve", "--artifacts", str(artifacts_root), "--ranker-workers", workers)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "--ranker-workers must be at least 1" in out, out
