"""What security costs: plaintext against mutual TLS on both hops, bearer tokens on
both services and per-caller rate limits in Redis, side by side.

    python -m benchmarks.security --work /work/bench1m [--rate 100 --seconds 60 --rounds 2]
        [--tracing 0.01]

Writes, under ``WORK/secure/``, a CA and certificates for the ranker, the
candidate service and two clients (made by ``trustme``), an API key for the load
generator and one for the ranker's calls to the candidate service, and
``WORK/sieve_secure.toml``: ``WORK/sieve.toml`` plus mutual TLS on both
services and on the ranker -> candidate hop, ``auth.required`` on both, and a
rate limit per caller in Redis (high enough never to refuse: its cost, not its
refusals). Then runs ``benchmarks.ab`` with the same checkout on both sides: A
plaintext, B secured, the load generator of B speaking mutual TLS with its token.
Results in ``benchmarks/results/security/``.

``--tracing RATIO`` adds to side B what production would run beside security:
OpenTelemetry traces of both services at that sample ratio, exported over OTLP/HTTP
to a sink in this process (it answers 200 and counts what it is sent, as a
collector would take it), and JSON logs with a ``request`` line for 1% of calls
(to a file). Results then in ``benchmarks/results/security/tracing<RATIO>/``.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, ROOT


class Sink:
    """An OTLP/HTTP endpoint that takes every export (200) and counts its bytes."""

    def __init__(self) -> None:
        self.exports = self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers["Content-Length"])
                self.rfile.read(n)
                sink.exports += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def traced(config: Path, ratio: float, url: str) -> Path:
    """``config`` plus traces of both services at ``ratio`` and JSON request logs."""
    out = config.with_name(f"{config.stem}_tracing{ratio:g}.toml")
    out.write_text(
        config.read_text()
        + "".join(
            f'\n[{svc}.tracing]\nenabled = true\nsample_ratio = {ratio}\nendpoint = "{url}"\n'
            for svc in ("ranker", "candidate")
        )
        + '\n[logging]\nformat = "json"\nrequest_sample = 0.01\n'
    )
    return out


def secure(work: Path) -> tuple[Path, str]:
    """The secured config and side B's load generator options."""
    import trustme

    d = work / "secure"
    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name in ("ranker", "candidate", "ranker-client", "loadgen"):
        cert = ca.issue_cert("127.0.0.1", "localhost", name)
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        (d / f"{name}.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    keys = {name: secrets.token_urlsafe(32) for name in ("loadgen", "ranker")}
    for name, key in keys.items():
        (d / f"{name}.token").write_text(key + "\n")
    sha = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in keys.items()}
    base = (work / "sieve.toml").read_text()
    redis_url = next(
        line.split("=", 1)[1].strip().strip('"')
        for line in base.splitlines()
        if line.startswith("redis_url")
    ).rsplit("/", 1)[0]
    secured = work / "sieve_secure.toml"
    secured.write_text(
        base
        + f"""
[ranker]
candidate_token_file = "{d / "ranker.token"}"

[ranker.tls]
cert_file = "{d / "ranker.pem"}"
key_file = "{d / "ranker.key"}"
client_ca_file = "{d / "ca.pem"}"

[ranker.candidate_tls]
ca_file = "{d / "ca.pem"}"
cert_file = "{d / "ranker-client.pem"}"
key_file = "{d / "ranker-client.key"}"

[ranker.auth]
required = true
api_keys = [{{ name = "loadgen", sha256 = "{sha["loadgen"]}", methods = ["Rank"] }}]

[ranker.rate_limit]
enabled = true
rate_per_s = 100000
burst = 100000
store = "redis"
redis_url = "{redis_url}/3"

[candidate.tls]
cert_file = "{d / "candidate.pem"}"
key_file = "{d / "candidate.key"}"
client_ca_file = "{d / "ca.pem"}"

[candidate.auth]
required = true
api_keys = [{{ name = "ranker", sha256 = "{sha["ranker"]}", methods = ["Retrieve"] }}]
"""
    )
    loadgen = (
        f"--ca-file {d / 'ca.pem'} --cert-file {d / 'loadgen.pem'} "
        f"--key-file {d / 'loadgen.key'} --token-file {d / 'loadgen.token'}"
    )
    return secured, loadgen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", required=True, help="a benchmarks.latency_budget work folder")
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS / "security"))
    ap.add_argument(
        "--tracing", type=float, help="side B also traces this share of calls (0-1), JSON logs"
    )
    ap.add_argument(
        "--secure-baseline",
        action="store_true",
        help="side A secured too (with --tracing: what tracing and logs add to security)",
    )
    args = ap.parse_args()
    work = Path(args.work).resolve()
    secured, loadgen = secure(work)
    results = Path(args.results)
    sink = None
    if args.tracing is not None:
        sink = Sink()
        secured = traced(secured, args.tracing, sink.url)
        results = results / f"tracing{args.tracing:g}"
    baseline: list[str] = []
    if args.secure_baseline:
        baseline = ["--config", str(work / "sieve_secure.toml"), "--a-loadgen-args", loadgen]
        results = results.with_name(results.name + "_secure_baseline")
    cmd = [
        sys.executable, "-m", "benchmarks.ab", "--work", str(work), *baseline,
        "--a", f"{ROOT}:app.cli", "--b", f"{ROOT}:app.cli", "--b-config", str(secured),
        "--b-loadgen-args", loadgen, "--rate", str(args.rate), "--seconds", str(args.seconds),
        "--rounds", str(args.rounds), "--results", str(results),
    ]  # fmt: skip
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    if sink is not None:
        print(f"trace sink: {sink.exports} exports, {sink.bytes / 1e6:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
