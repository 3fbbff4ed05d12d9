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
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not installed (`make redis` installs it)")
    port = port or free_port()
    persist = ["--dir", str(data_dir), "--dbfilename", "dump.rdb"] if data_dir else []
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + persist,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:  # BusyLoadingError too, while it loads a dump
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not come up on port {port}") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
