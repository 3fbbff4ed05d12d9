"""OpenTelemetry traces across both services, each in its own process, exported
over OTLP/HTTP to a receiver in this test that decodes the collector protocol
(``opentelemetry-proto``): one trace id from the caller's ``traceparent``
through the ranker's Rank and stage spans to the candidate's Retrieve span; and
both processes' JSON log lines carrying that trace id and one request id."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from tests.conftest import sieve_process


class Receiver:
    """An OTLP/HTTP traces endpoint: every span it is sent, flattened."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    )
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            receiver.spans.append({
                                "service": service,
                                "name": s.name,
                                "trace": s.trace_id.hex(),
                                "span": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "attrs": {a.key: a.value for a in s.attributes},
                                "events": [e.name for e in s.events],
                                "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                            })  # fmt: skip
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def _serve(only: str, config: Path, root: Path, ready: Path, *extra: str) -> Any:
    return sieve_process(
        "--config", str(config), "serve", "--only", only, "--artifacts", str(root),
        "--ready-file", str(ready), "--loop", "asyncio", *extra,
    )  # fmt: skip


def _wait(ready: Path, procs: list[Any]) -> int:
    deadline = time.monotonic() + 120
    while not ready.exists():
        for p in procs:
            assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "not ready in 120 s"
        time.sleep(0.1)
    time.sleep(0.1)
    return int(ready.read_text().split()[1])


def test_one_trace_across_both_processes(
    artifacts_root: Path, receiver: Receiver, tmp_path: Path
) -> None:
    # sample_ratio 0: only a caller's sampled traceparent starts a trace (ParentBased)
    key_file = tmp_path / "user_id.key"
    key_file.write_text(secrets.token_hex(32))
    config = tmp_path / "sieve.toml"
    config.write_text(
        f'[candidate.tracing]\nenabled = true\nsample_ratio = 0.0\nendpoint = "{receiver.url}"\n\n'
        f'[ranker.tracing]\nenabled = true\nsample_ratio = 0.0\nendpoint = "{receiver.url}"\n\n'
        "[ranker.reliability]\nmetrics_port = 0\n\n"
        f'[logging]\nformat = "json"\nrequest_sample = 1.0\nuser_id_key_file = "{key_file}"\n'
    )
    procs = []
    try:
        cready, rready = tmp_path / "c.ready", tmp_path / "r.ready"
        procs.append(_serve("candidate", config, artifacts_root, cready, "--candidate-port", "0"))
        cport = _wait(cready, procs)
        procs.append(
            _serve("ranker", config, artifacts_root, rready, "--ranker-port", "0",
                   "--candidate-address", f"127.0.0.1:{cport}")
        )  # fmt: skip
        rport = _wait(rready, procs)
        mport = int(rready.read_text().split()[3])  # "ranker PORT metrics M"
        trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        with grpc.insecure_channel(f"127.0.0.1:{rport}") as ch:
            stub = sieve_pb2_grpc.RankerServiceStub(ch)
            untraced = stub.Rank(sieve_pb2.RankRequest(user_id=414), timeout=30)
            answer = stub.Rank(
                sieve_pb2.RankRequest(user_id=42),
                timeout=30,
                metadata=(("traceparent", f"00-{trace_id}-{caller_span}-01"),),
            )
        assert untraced.items and answer.items
        # the latency histograms carry the sampled call's trace id as an exemplar
        req = urllib.request.Request(
            f"http://127.0.0.1:{mport}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            exposition = r.read().decode()
        assert any(
            line.startswith("sieve_rank_stage_seconds_bucket") and f'trace_id="{trace_id}"' in line
            for line in exposition.splitlines()
        ), "no exemplar carries the trace id"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            mine = [s for s in receiver.spans if s["trace"] == trace_id]
            if {s["service"] for s in mine} == {"sieve-ranker", "sieve-candidate"} and any(
                s["name"] == "Rank" for s in mine
            ):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
        outputs = [p.communicate(timeout=30)[0] for p in procs]
    check_logs(outputs, trace_id, answer.artifact_version, key_file.read_text().encode())
    mine = [s for s in receiver.spans if s["trace"] == trace_id]
    assert len({s["trace"] for s in receiver.spans}) == 1, "the untraced Rank was traced"
    by = {(s["service"], s["name"]): s for s in mine}
    rank = by["sieve-ranker", "Rank"]
    assert rank["parent"] == caller_span  # the caller's traceparent honoured
    assert rank["attrs"]["sieve.artifact_version"].string_value == answer.artifact_version
    stages = [t.stage for t in answer.timings if t.stage != "total"]
    for stage in stages:
        span = by["sieve-ranker", stage]
        assert span["parent"] == rank["span"], stage
        assert rank["start"] <= span["start"] <= span["end"] <= rank["end"] + 1_000_000, stage
    assert by["sieve-ranker", "score"]["attrs"]["sieve.deadline_ms"].double_value > 0
    retrieve = by["sieve-candidate", "Retrieve"]
    assert retrieve["parent"] == by["sieve-ranker", "retrieve"]["span"]  # joined over gRPC
    assert retrieve["attrs"]["sieve.artifact_version"].string_value == answer.artifact_version


def check_logs(outputs: list[str], trace_id: str, version: str, key: bytes) -> None:
    """Every log line is one JSON object (the rest of the output is the ready and
    shutdown notices ``sieve serve`` prints); the traced Rank's request line and the
    Retrieve it made carry its trace id and one request id; the user id is hashed."""
    text_log = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR) ")
    lines = []
    for out in outputs:
        for line in out.splitlines():
            assert not text_log.match(line), f"a text log line: {line}"
            if line.startswith("{"):
                lines.append(json.loads(line))
    assert all({"time", "level", "logger", "message"} <= set(r) for r in lines)
    requests = [r for r in lines if r["message"] == "request"]
    rank = [r for r in requests if r["method"] == "Rank" and r.get("trace_id") == trace_id]
    assert len(rank) == 1, requests
    user = hmac.new(key, b"42", hashlib.sha256).hexdigest()[:16]
    assert rank[0]["user"] == user and rank[0]["version"] == version
    assert rank[0]["caller"] == "anonymous" and rank[0]["stage_ms"]["total"] > 0
    retrieve = [r for r in requests if r["method"] == "Retrieve"]
    assert {r["request_id"] for r in retrieve} == {
        r["request_id"] for r in requests if r["method"] == "Rank"
    }
    joined = [r for r in retrieve if r["request_id"] == rank[0]["request_id"]]
    assert len(joined) == 1 and joined[0]["trace_id"] == trace_id
    assert joined[0]["span_id"] != rank[0]["span_id"]  # the candidate's own span
    assert not any('"42"' in json.dumps(r.get("user")) for r in requests)
