"""Local plumbing: a free loopback port, a throwaway redis-server (tests, demos)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, data_dir: Path | None = None) -> subprocess.Popen[bytes]:
    """Start Debian's ``redis-server`` on loopback ``port`` (see ``local_redis``).

    Raises:
        FileNotFoundError: redis-server is not installed.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not installed (`make redis` installs it)")
    persist = ["--dir", str(data_dir), "--dbfilename", "dump.rdb"] if data_dir else []
    return subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + persist,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def wait_for_redis(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 20.0) -> None:
    """Return once the server answers PING (a dump it loads at start included).

    Raises:
        RuntimeError: it exited, or did not answer within ``timeout_s``.
    """
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:  # BusyLoadingError too, while it loads a dump
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not come up on port {port}") from None
                time.sleep(0.05)
    finally:
        client.close()


@contextmanager
def local_redis(
    start_timeout_s: float = 20.0, port: int | None = None, data_dir: Path | None = None
) -> Iterator[str]:
    """Run Debian's ``redis-server``; yield ``"127.0.0.1:PORT"``.

    Without ``data_dir`` nothing is persisted. With it, the server loads
    ``data_dir/dump.rdb`` at start if there is one, and writes it only when asked
    (``SAVE``), so a benchmark can keep a materialized store between runs.

    Raises:
        FileNotFoundError: redis-server is not installed.
        RuntimeError: it did not answer PING within ``start_timeout_s``.
    """
    port = port or free_port()
    proc = start_redis(port, data_dir)
    try:
        wait_for_redis(proc, port, start_timeout_s)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
