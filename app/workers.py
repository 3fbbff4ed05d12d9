"""``sieve serve --ranker-workers N``: N ranker processes on one host, supervised.

Each worker is a whole ranker (``sieve serve --only ranker``) in its own process,
so N of them use N cores' worth of Python where one process is bound by its GIL
and its event loop. Each listens on **its own port** (the configured port + i,
or a free port each when it is 0) rather than all on one port with
SO_REUSEPORT: the kernel spreads *connections* over SO_REUSEPORT listeners, and a
gRPC client keeps one long-lived connection per address, so one client's calls
would all land on one worker. With a port each, a client balances *every call*
with gRPC's ``round_robin`` over the list (``ipv4:127.0.0.1:P,127.0.0.1:P+1``
here; ``dns:///`` over a Kubernetes headless Service, where a pod is one worker).
Servers close connections after ``max_connection_age_s`` so clients re-resolve
and find new replicas.

What workers must share lives in Redis: the shown-history (``[ranker.rerank.history]
store = "redis"``; a worker's own memory would let each worker show the same items
again, so more than one worker refuses the in-process store). The response cache
may stay in process (each worker's fallback answers are its own); the in-flight
bound is per worker, as it bounds that process's queue.

With ``--candidate-shards S`` it starts S candidate processes, one per shard of
a sharded set (``--shard i``, ports from the candidate port up), and the workers
scatter every Retrieve to all of them (``ranker/scatter.py``).

The supervisor starts the candidate service first (unless ``--only ranker``),
then the workers; it writes the ready file once all serve (one line per process:
``candidate PORT``, then ``ranker PORT [metrics PORT]`` each), restarts a worker
that exits (its port stays the same), and on SIGTERM stops the workers before the
candidate service.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from app.config import SieveConfig
from sieve.errors import ConfigError

log = logging.getLogger("sieve.workers")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
"""Waits before restarting a worker that exited, by how often it did in a row."""
STEADY_S = 60.0
"""A worker up this long counts as healthy again: its next exit waits the first backoff."""


@dataclass
class Child:
    """One supervised process: the candidate service or a ranker worker."""

    role: str  # "candidate" or "ranker"
    index: int
    port: int  # asked for (0: a free one)
    metrics_port: int  # asked for (-1: none)
    ready: Path
    proc: subprocess.Popen[bytes] | None = None
    bound: str = ""  # its ready-file line once it serves
    started: float = 0.0
    exits: int = 0  # exits in a row without a steady run
    restart_at: float | None = None
    extra: list[str] = field(default_factory=list)
    shard: bool = False  # a candidate shard (``--shard index``)

    @property
    def name(self) -> str:
        if self.role == "candidate":
            return f"candidate shard {self.index}" if self.shard else "candidate"
        return f"ranker worker {self.index}"


def check_shared_state(cfg: SieveConfig, workers: int) -> None:
    """Raises ConfigError when ``workers`` rankers would each keep state that must be
    shared between them."""
    if workers > 1 and cfg.ranker.rerank.history.store == "memory":
        raise ConfigError(
            f"--ranker-workers {workers}: each worker would keep its own shown-history, so "
            "fatigue would show a user the same items again on another worker; set "
            '[ranker.rerank.history] store = "redis" (and redis_url) to share it'
        )
    if workers > 1 and cfg.ranker.reliability.response_cache.store == "memory":
        log.info(
            "ranker workers keep their own response cache (store = 'memory'): a fallback "
            "answer is only found on the worker that cached it; 'redis' shares it"
        )


class Supervisor:
    """Start, watch and stop the processes of ``sieve serve --ranker-workers N``."""

    def __init__(
        self,
        cfg: SieveConfig,
        base_cmd: list[str],
        workers: int,
        only: str | None,
        candidate_address: str | None,
        ready_file: Path | None,
        start_timeout_s: float = 600.0,
        shards: int = 1,
    ) -> None:
        self.cfg = cfg
        self.base_cmd = base_cmd  # python -m app.cli [--config C] serve --artifacts A --loop L
        self.workers = workers
        self.shards = shards
        self.only = only
        self.candidate_address = candidate_address
        self.ready_file = ready_file
        self.start_timeout_s = start_timeout_s
        self._tmp = Path(tempfile.mkdtemp(prefix="sieve-workers-"))
        self._stopping = False
        self.children: list[Child] = []

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _spawn(self, child: Child) -> None:
        child.ready.unlink(missing_ok=True)
        cmd = [*self.base_cmd, "--only", child.role, "--ready-file", str(child.ready)]
        if child.role == "candidate":
            cmd += ["--candidate-port", str(child.port)]
            if self.shards > 1:
                cmd += ["--shard", str(child.index)]
        else:
            cmd += ["--ranker-port", str(child.port), "--ranker-workers", "1", *child.extra]
            if child.metrics_port >= 0:
                cmd += ["--ranker-metrics-port", str(child.metrics_port)]
        child.proc = subprocess.Popen(cmd)
        child.started = time.monotonic()
        child.bound = ""
        child.restart_at = None

    def _wait_ready(self, children: list[Child]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        for child in children:
            while not child.ready.exists():
                assert child.proc is not None
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode} at start")
                if self._stopping:
                    raise KeyboardInterrupt
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} not serving in {self.start_timeout_s:.0f} s")
                time.sleep(0.1)
            time.sleep(0.05)  # the line is written in one call; let it land
            child.bound = child.ready.read_text().strip()
            if child.port == 0:
                # a restart keeps the port clients already balance over
                child.port = int(child.bound.split()[1])
                if child.metrics_port == 0 and " metrics " in child.bound:
                    child.metrics_port = int(child.bound.split()[3])

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; 0 on a clean stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        rcfg = self.cfg.ranker
        try:
            address = self.candidate_address
            extra = ["--candidate-address", address] if address else []
            if self.only != "ranker":
                cport = self.cfg.candidate.port
                cands = [
                    Child(
                        "candidate",
                        i,
                        cport + i if cport else 0,
                        -1,
                        self._tmp / f"candidate{i}",
                        shard=self.shards > 1,
                    )
                    for i in range(self.shards)
                ]
                self.children += cands
                for c in cands:
                    self._spawn(c)
                self._wait_ready(cands)
                addresses = [f"{self.cfg.candidate.host}:{c.port}" for c in cands]
                if self.shards > 1:
                    extra = [a for address in addresses for a in ("--candidate-shard", address)]
                else:
                    extra = ["--candidate-address", addresses[0]]
            base, mport = rcfg.port, rcfg.reliability.metrics_port
            n_workers = 0 if self.only == "candidate" else self.workers
            workers = [
                Child(
                    "ranker",
                    i,
                    base + i if base else 0,
                    mport + i if mport > 0 else mport,
                    self._tmp / f"ranker{i}",
                    extra=extra,
                )
                for i in range(n_workers)
            ]
            self.children += workers
            for w in workers:
                self._spawn(w)
            self._wait_ready(workers)
        except (RuntimeError, KeyboardInterrupt) as e:
            if isinstance(e, RuntimeError):
                print(f"sieve serve: {e}", file=sys.stderr)
            self._shutdown()
            return 1 if isinstance(e, RuntimeError) else 0
        if workers:
            ports = ",".join(f"{rcfg.host}:{w.port}" for w in workers)
            over = f" over {self.shards} candidate shards" if self.shards > 1 else ""
            print(f"{len(workers)} ranker workers{over} serving on ipv4:{ports}", flush=True)
        else:
            ports = ",".join(f"{self.cfg.candidate.host}:{c.port}" for c in self.children)
            print(f"{self.shards} candidate shards serving on {ports}", flush=True)
        if self.ready_file is not None:
            self.ready_file.write_text("".join(f"{c.bound}\n" for c in self.children))
        while not self._stopping:
            self._watch()
            time.sleep(0.2)
        print("shutting down (workers first, then the candidate service)", flush=True)
        return self._shutdown()

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if child.restart_at is not None:
                if now >= child.restart_at:
                    log.warning("restarting %s on port %d", child.name, child.port)
                    self._spawn(child)
                continue
            if proc is None or proc.poll() is None:
                continue
            if now - child.started >= STEADY_S:
                child.exits = 0
            wait = RESTART_BACKOFF_S[min(child.exits, len(RESTART_BACKOFF_S) - 1)]
            child.exits += 1
            log.warning(
                "%s (pid %d) exited with %s; restarting in %.1f s",
                child.name, proc.pid, proc.returncode, wait,
            )  # fmt: skip
            child.restart_at = now + wait

    def _shutdown(self) -> int:
        """SIGTERM to the workers, then the candidate service; wait for each (their
        own grace and drain), kill what outlives it. The exit status: 0 when every
        process stopped cleanly."""
        codes = []
        waits = {
            "ranker": self.cfg.ranker.grace_s + self.cfg.ranker.drain_s + 10.0,
            "candidate": self.cfg.candidate.grace_s + self.cfg.candidate.drain_s + 10.0,
        }
        for role in ("ranker", "candidate"):
            group = [c for c in self.children if c.role == role and c.proc is not None]
            for c in group:
                if c.proc is not None and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            for c in group:
                assert c.proc is not None
                try:
                    code = c.proc.wait(timeout=waits[role])
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    code = c.proc.wait()
                if c.restart_at is None:  # not one that had exited already
                    codes.append(code)
        return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1
