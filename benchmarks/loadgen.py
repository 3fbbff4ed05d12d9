"""Open-loop load generator for ``Rank``: Poisson arrivals at a fixed rate.

    python -m benchmarks.loadgen --address 127.0.0.1:50062 --rate 100 \\
        --duration 60 --warmup 5 --users-file users.txt --out result.json

Arrival times are drawn up front (exponential gaps, seeded); each request is sent
at its time whatever the earlier ones are doing, and its latency is measured from
that intended time, so a stall that delays sends shows up in the latency instead of
thinning the load (no coordinated omission). Requests of the warm-up are sent but
not recorded. The run is bounded: ``rate x (warmup + duration)`` requests, each
with a deadline (``--timeout``). Records the latency in an HDR histogram (1 us to
60 s, 3 significant digits), status codes, degraded answers, and each stage's
server-side time from the response, also summed per line of the latency budget
(``harness.BUDGET_MS``, from the ranker's ``StageBudgetMs``); the histograms of
every call (``hdr``) and of the answered ones (``ok_hdr``) go out encoded, for
pooling runs. Loopback only: it refuses other addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from hdrh.histogram import HdrHistogram

from benchmarks.harness import BUDGET_MS, hdr_cdf, hdr_record, hdr_summary, histogram
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve.auth import bearer
from sieve.grpc_server import client_options


async def run(
    address: str,
    rate: float,
    duration_s: float,
    warmup_s: float,
    users: np.ndarray,
    seed: int = 0,
    timeout_s: float = 5.0,
    k: int = 50,
    timeline: bool = False,
    started_file: Path | None = None,
    security: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Drive ``Rank`` open-loop at ``rate`` per second; returns the measurements.

    ``started_file`` is written (the Unix time) when the first request is due.
    With ``timeline``, also every recorded request as ``[intended send time (Unix
    s), latency ms, status code, rungs taken ("+"-joined; "" for full quality),
    artifact version, degradation kinds ("+"-joined)]`` in send order, for lining
    answers up with injected faults. ``security``: ``token_file`` (a bearer token
    sent on every call), ``ca_file`` (TLS; with ``cert_file`` and ``key_file``,
    mutual TLS) and ``server_name``.
    """
    targets = address.removeprefix("ipv4:").removeprefix("ipv6:").split(",")
    for target in targets:  # one address, or an ipv4: list of replicas
        host = target.rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ValueError(f"loopback only, got {address!r}")
    rng = np.random.default_rng(seed)
    horizon = warmup_s + duration_s
    gaps = rng.exponential(1.0 / rate, int(rate * horizon * 1.5) + 10)
    at = np.cumsum(gaps)
    at = at[at < horizon]
    who = rng.choice(users, len(at))

    total = histogram()
    total_ok = histogram()  # the answered ones: what accepted calls saw
    total_shed = histogram()  # RESOURCE_EXHAUSTED: how fast a refusal comes back
    stages: dict[str, HdrHistogram] = {}
    budget: dict[str, HdrHistogram] = {}  # per line of BUDGET_MS, summed per request
    codes: dict[str, int] = {}
    degraded: dict[str, int] = {}
    rungs: dict[str, int] = {}
    on_rung = [0]  # answers that took at least one rung
    events: list[tuple[float, float, str, str, str, str]] = []
    recorded = [0]
    loop = asyncio.get_running_loop()
    # round_robin: an ipv4: list of ranker workers gets every call balanced
    sec = security or {}
    metadata = (
        bearer(Path(sec["token_file"]).read_text().strip()) if sec.get("token_file") else None
    )
    if sec.get("ca_file"):
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(sec["ca_file"]).read_bytes(),
            private_key=Path(sec["key_file"]).read_bytes() if sec.get("key_file") else None,
            certificate_chain=Path(sec["cert_file"]).read_bytes() if sec.get("cert_file") else None,
        )
        name = (
            [("grpc.ssl_target_name_override", sec["server_name"])]
            if sec.get("server_name")
            else []
        )
        channel = grpc.aio.secure_channel(address, creds, options=client_options() + name)
    else:
        channel = grpc.aio.insecure_channel(address, options=client_options())
    stub = sieve_pb2_grpc.RankerServiceStub(channel)
    await channel.channel_ready()

    async def one(intended: float, user: int, record: bool) -> None:
        try:
            resp = await stub.Rank(
                sieve_pb2.RankRequest(user_id=user, k=k), timeout=timeout_s, metadata=metadata
            )
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code, resp = e.code().name, None
        latency_us = max(1, int((loop.time() - intended) * 1e6))
        if not record:
            return
        recorded[0] += 1
        codes[code] = codes.get(code, 0) + 1
        hdr_record(total, latency_us)
        if timeline:
            events.append((
                wall0 + intended - start,
                latency_us / 1e3,
                code,
                "+".join(resp.rungs) if resp is not None else "",
                resp.artifact_version if resp is not None else "",
                "+".join(sorted({d.split(":", 1)[0] for d in resp.degradations}))
                if resp is not None else "",
            ))  # fmt: skip
        if resp is None:
            if code == "RESOURCE_EXHAUSTED":
                hdr_record(total_shed, latency_us)
            return
        hdr_record(total_ok, latency_us)
        for d in resp.degradations:
            kind = d.split(":", 1)[0]
            degraded[kind] = degraded.get(kind, 0) + 1
        for rung in resp.rungs:
            rungs[rung] = rungs.get(rung, 0) + 1
        on_rung[0] += bool(resp.rungs)
        server_total = 0
        for t in resp.timings:
            hdr_record(stages.setdefault(t.stage, histogram()), t.micros)
            if t.stage == "total":
                server_total = t.micros
        # what the server did not account for: serialisation, the network hop,
        # and the client's own scheduling
        micros = {t.stage: t.micros for t in resp.timings}
        micros["client_overhead"] = max(1, latency_us - server_total)
        hdr_record(stages.setdefault("client_overhead", histogram()), micros["client_overhead"])
        for line, (_, parts) in BUDGET_MS.items():
            if all(p in micros for p in parts):
                us = max(1, sum(micros[p] for p in parts))
                hdr_record(budget.setdefault(line, histogram()), us)

    start = loop.time() + 0.05
    wall0 = time.time() + 0.05  # the wall-clock time of ``start``
    if started_file is not None:
        started_file.write_text(f"{wall0}\n")
    t0 = time.perf_counter()
    tasks = []
    for when, user in zip(at, who, strict=True):
        delay = start + when - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(start + when, int(user), when >= warmup_s)))
    send_end = loop.time()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    await channel.close()
    late = max(0.0, send_end - (start + float(at[-1]))) if len(at) else 0.0
    n_ok = codes.get("OK", 0)
    return {
        "address": address,
        "offered_rps": rate,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "sent": int(len(at)),
        "recorded": recorded[0],
        "ok": n_ok,
        "errors": {c: n for c, n in codes.items() if c != "OK"},
        "degraded": degraded,
        "rungs": rungs,
        "answers_on_a_rung": on_rung[0],
        "achieved_rps": recorded[0] / duration_s if duration_s else 0.0,
        "wall_s": wall,
        "sender_lag_s": late,
        "latency_ms": hdr_summary(total),
        "ok_latency_ms": hdr_summary(total_ok),
        **({"shed_latency_ms": hdr_summary(total_shed)} if total_shed.get_total_count() else {}),
        "cdf_ms": hdr_cdf(total),
        "stages_ms": {name: hdr_summary(h) for name, h in stages.items()},
        "budget_ms": {
            line: {"budget_p99": BUDGET_MS[line][0], **hdr_summary(h)} for line, h in budget.items()
        },
        "hdr": total.encode().decode(),
        "ok_hdr": total_ok.encode().decode(),
        **({"timeline": sorted(events)} if timeline else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--address", required=True)
    ap.add_argument("--rate", type=float, required=True, help="requests per second (Poisson)")
    ap.add_argument("--duration", type=float, default=30.0, help="recorded seconds")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds sent, not recorded")
    ap.add_argument("--users-file", required=True, help="one user id per line")
    ap.add_argument("--timeout", type=float, default=5.0, help="deadline per request, s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeline", action="store_true", help="record every request")
    ap.add_argument("--started-file", help="written when sending starts")
    ap.add_argument("--out", required=True)
    for name, what in (
        ("token-file", "a file holding a bearer token sent on every call"),
        ("ca-file", "TLS: the CA the ranker's certificate chains to"),
        ("cert-file", "mutual TLS: this client's certificate"),
        ("key-file", "mutual TLS: its key"),
        ("server-name", "TLS: the name to check in the ranker's certificate"),
    ):
        ap.add_argument(f"--{name}", default="", help=what)
    args = ap.parse_args()
    security = {
        k: getattr(args, k)
        for k in ("token_file", "ca_file", "cert_file", "key_file", "server_name")
    }
    users = np.loadtxt(args.users_file, dtype=np.int64, ndmin=1)
    result = asyncio.run(
        run(args.address, args.rate, args.duration, args.warmup, users, args.seed, args.timeout,
            timeline=args.timeline,
            started_file=Path(args.started_file) if args.started_file else None,
            security=security)
    )  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    lat = result["latency_ms"]
    print(
        f"{args.rate:g}/s: sent {result['sent']}, ok {result['ok']}, errors {result['errors']}, "
        f"p50 {lat.get('p50', float('nan')):.2f} p99 {lat.get('p99', float('nan')):.2f} ms"
    )


if __name__ == "__main__":
    main()
