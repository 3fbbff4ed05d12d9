"""The metrics as an operator uses them: Debian's ``promtool`` checks the alert
rules, a real ``prometheus`` server scrapes a real ranker and answers a PromQL
p99 of Rank, and every metric the dashboard and the rules name is exported."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from candidate.config import CandidateConfig
from candidate.service import create_server as create_candidate
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from ranker.config import RankerConfig, ReliabilityConfig
from ranker.service import create_server as create_ranker
from sieve.local_redis import free_port
from sieve.metrics import LATENCY_BUCKETS
from tests.conftest import ROOT, STATELESS

MONITORING = ROOT / "deploy" / "monitoring"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (`make prometheus` installs it)")
    return path


def test_promtool_accepts_the_alert_rules() -> None:
    done = subprocess.run(
        [_tool("promtool"), "check", "rules", str(MONITORING / "alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 4 rules found" in done.stdout


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A config file to write targets into, and the server's port (started by
    ``_start``)."""
    yield tmp_path, free_port()


def _start(tmp: Path, port: int, target: str) -> subprocess.Popen[bytes]:
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{MONITORING / 'alerts.yml'}']\n"
        "scrape_configs:\n  - job_name: sieve\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    return subprocess.Popen(
        [_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _query(port: int, expr: str) -> list[Any]:
    q = urllib.parse.urlencode({"query": expr})
    body = _get(f"http://127.0.0.1:{port}/api/v1/query?{q}")
    assert body["status"] == "success", body
    return list(body["data"]["result"])


async def test_prometheus_scrapes_the_ranker_and_answers_p99(
    artifacts_root: Path, prometheus: tuple[Path, int]
) -> None:
    tmp, pport = prometheus
    cserver, _ = await create_candidate(CandidateConfig(port=0), artifacts_root)
    rserver, _ = await create_ranker(
        RankerConfig(
            port=0,
            candidate_address=f"127.0.0.1:{cserver.port}",
            item_refresh_s=0,
            rerank=STATELESS,
            reliability=ReliabilityConfig(metrics_port=0),
        ),
        artifacts_root,
    )
    proc = _start(tmp, pport, f"127.0.0.1:{rserver.metrics_port}")
    try:
        deadline = time.monotonic() + 60
        while True:  # up, and one scrape in before the load (rate() counts from there)
            try:
                if [r for r in _query(pport, "up") if r["value"][1] == "1"]:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "prometheus not up"
            await asyncio.sleep(0.5)
        totals = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rserver.port}") as ch:
            stub = sieve_pb2_grpc.RankerServiceStub(ch)
            for user in list(range(1, 61)):
                r = await stub.Rank(sieve_pb2.RankRequest(user_id=user), timeout=30)
                totals.append(next(t.micros for t in r.timings if t.stage == "total") / 1e6)
        await asyncio.sleep(3.5)  # two scrapes after the last call
        expr = (
            "histogram_quantile(0.99, sum by (le) "
            '(rate(sieve_rank_stage_seconds_bucket{stage="total"}[1m])))'
        )
        (result,) = _query(pport, expr)
        p99 = float(result["value"][1])
        # PromQL interpolates inside the bucket that holds rank 0.99 x count: between
        # the buckets of the observations either side of that rank
        ranked = sorted(totals)
        rank = 0.99 * len(ranked)
        low, high = ranked[int(rank) - 1], ranked[min(int(rank), len(ranked) - 1)]
        edges = [0.0, *LATENCY_BUCKETS, float("inf")]

        def bucket(v: float) -> int:
            return next(j for j in range(1, len(edges)) if v <= edges[j])

        assert edges[bucket(low) - 1] <= p99 <= edges[bucket(high)], (p99, low, high)
        stages = {r["metric"]["stage"] for r in _query(pport, "sieve_rank_stage_seconds_count")}
        assert {"user_features", "retrieve", "item_features", "score", "rerank", "total"} <= stages
        # every metric the dashboard and the alert rules use is one the ranker exports
        exported = {r["metric"]["__name__"] for r in _query(pport, '{__name__=~"sieve_.+"}')}
        dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        rules_text = (MONITORING / "alerts.yml").read_text()
        used = set(re.findall(r"\bsieve_[a-z_]+", rules_text + "\n".join(exprs)))
        assert used <= exported, used - exported
        rules = _get(f"http://127.0.0.1:{pport}/api/v1/rules")["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} >= {"SieveRankP99OverBudget", "SieveBreakerOpen"}
        assert all(r["health"] == "ok" for r in rules), rules
    finally:
        proc.terminate()
        proc.wait(30)
        await rserver.stop(0)
        await cserver.stop(0)
