"""Locust load test of ``Rank``, for users who drive load with Locust.

    pip install -e '.[locust]'
    locust -f benchmarks/locustfile.py --host 127.0.0.1:50062 \\
        --sieve-users-file .bench/latency_1000000/users.txt \\
        --headless -u 20 -r 20 -t 60s --csv benchmarks/results/locust

Each Locust user sends ``Rank`` for a random user id of the file (one id per
line), then waits ``--sieve-wait`` seconds. Every call is reported to Locust as
``grpc Rank``; an answer that took a rung of the degradation ladder is reported
a second time, as ``grpc Rank [degraded: <rungs>]``, so Locust's tables show how
much was given up; a non-OK status is a failure with the status code's name.

Locust's users are closed-loop: a user waits for its answer before its next
call, so a server stall slows the offered load instead of showing up as
latency (coordinated omission). sieve's own figures come from the open-loop
``benchmarks.loadgen`` (``python -m benchmarks.latency_budget``); use this file
to fit sieve into an existing Locust setup, not to compare with those figures.
"""

from __future__ import annotations

# gRPC's gevent integration must be set up before any channel exists.
import grpc.experimental.gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()

import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
from locust import User, events, task  # noqa: E402

from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc  # noqa: E402


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument(
        "--sieve-users-file", default="", help="user ids to rank, one per line (required)"
    )
    parser.add_argument("--sieve-k", type=int, default=50, help="items per Rank")
    parser.add_argument("--sieve-timeout", type=float, default=5.0, help="deadline, seconds")
    parser.add_argument("--sieve-wait", type=float, default=0.5, help="think time, seconds")


class RankUser(User):
    """One caller of ``Rank`` on ``--host`` (host:port, loopback or not)."""

    def wait_time(self) -> float:
        return random.uniform(0.0, 2 * self.think_s)  # mean --sieve-wait

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        path = Path(opts.sieve_users_file)
        if not opts.sieve_users_file or not path.is_file():
            raise SystemExit(f"--sieve-users-file {str(path)!r} is not a file of user ids")
        self.user_ids = [int(line) for line in path.read_text().split() if line.strip()]
        if not self.user_ids:
            raise SystemExit(f"--sieve-users-file {path} holds no user ids")
        self.k, self.timeout = opts.sieve_k, opts.sieve_timeout
        self.think_s = opts.sieve_wait
        host = (self.host or "").removeprefix("http://").removeprefix("grpc://")
        self.channel = grpc.insecure_channel(host)
        self.stub = sieve_pb2_grpc.RankerServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def rank(self) -> None:
        request = sieve_pb2.RankRequest(user_id=random.choice(self.user_ids), k=self.k)
        t0 = time.perf_counter()
        response, error = None, None
        try:
            response = self.stub.Rank(request, timeout=self.timeout)
        except grpc.RpcError as e:
            error = RuntimeError(e.code().name)  # the status, as Locust groups failures
        ms = (time.perf_counter() - t0) * 1e3
        size = response.ByteSize() if response is not None else 0
        fire = self.environment.events.request.fire
        fire(request_type="grpc", name="Rank", response_time=ms, response_length=size,
             exception=error, context={})  # fmt: skip
        if response is not None and response.rungs:
            fire(request_type="grpc", name=f"Rank [degraded: {'+'.join(response.rungs)}]",
                 response_time=ms, response_length=size, exception=None, context={})  # fmt: skip
