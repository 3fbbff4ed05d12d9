"""Local plumbing: a free loopback port, a throwaway redis-server (tests, demos)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A loopback port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(
    port: int, data_dir: Path | None = None, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """Start Debian's ``redis-server`` on loopback ``port`` (see ``local_redis``);
    ``extra``: more of its options.

    Raises:
        FileNotFoundError: redis-server is not installed.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not installed (`make redis` installs it)")
    persist = ["--dir", str(data_dir), "--dbfilename", "dump.rdb"] if data_dir else []
    return subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + persist
        + list(extra),
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


def cluster_node(port: int, bus_port: int, data_dir: Path) -> subprocess.Popen[bytes]:
    """One node of a local Redis Cluster: cluster mode, its bus on ``bus_port``
    (the default, port + 10000, may be taken or past 65535), its ``nodes.conf`` in
    ``data_dir`` (so a restarted node rejoins with its slots), no persistence of
    the data itself, and the slots of a node that is down left to fail alone
    (``cluster-require-full-coverage no``): the other masters keep answering."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return start_redis(
        port,
        None,
        ("--cluster-enabled", "yes", "--cluster-port", str(bus_port), "--dir", str(data_dir),
         "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
         "--cluster-require-full-coverage", "no"),
    )  # fmt: skip


def wait_for_cluster(port: int, masters: int, timeout_s: float = 30.0) -> None:
    """Return once the node on ``port`` sees the cluster ``ok`` with every slot
    assigned to ``masters`` masters.

    Raises:
        RuntimeError: not within ``timeout_s``.
    """
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                info: Any = client.cluster("info")
                if (
                    info.get("cluster_state") == "ok"
                    and int(info.get("cluster_slots_ok", 0)) == 16384
                    and int(info.get("cluster_size", 0)) == masters
                ):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError(f"redis cluster on port {port} not ok within {timeout_s} s")


class LocalCluster:
    """The nodes of ``local_redis_cluster``, each of which may be killed and
    started again on its port (it rejoins from its ``nodes.conf``)."""

    def __init__(self, data_dir: Path, size: int) -> None:
        self.data_dir = data_dir
        self.ports = [free_port() for _ in range(size)]
        self.bus_ports = [free_port() for _ in range(size)]
        self.procs = [self._start(i) for i in range(size)]

    @property
    def nodes(self) -> list[str]:
        """Every node's ``127.0.0.1:PORT``, masters first (as created)."""
        return [f"127.0.0.1:{p}" for p in self.ports]

    def _start(self, i: int) -> subprocess.Popen[bytes]:
        return cluster_node(self.ports[i], self.bus_ports[i], self.data_dir / str(self.ports[i]))

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``."""
        self.procs[i].kill()
        self.procs[i].wait(10)

    def restart(self, i: int, timeout_s: float = 30.0) -> None:
        """Start node ``i`` again on its port; return once it answers."""
        self.procs[i] = self._start(i)
        wait_for_redis(self.procs[i], self.ports[i], timeout_s)

    def role(self, i: int) -> str:
        """``master`` or ``slave``, as node ``i`` sees itself now."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.ports[i])
        try:
            info: Any = client.info("replication")
            return str(info["role"])
        finally:
            client.close()

    def replica_of(self, i: int) -> int:
        """The node replicating node ``i`` (-1: none)."""
        import redis

        for j, port in enumerate(self.ports):
            client = redis.Redis(host="127.0.0.1", port=port)
            try:
                info: Any = client.info("replication")
            finally:
                client.close()
            if info["role"] == "slave" and int(info["master_port"]) == self.ports[i]:
                return j
        return -1

    def wait_role(self, i: int, role: str, timeout_s: float = 30.0) -> float:
        """Seconds until node ``i`` reports ``role`` (``master`` or ``slave``).

        Raises:
            RuntimeError: not within ``timeout_s``.
        """
        import redis

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            try:
                if self.role(i) == role:
                    return time.monotonic() - t0
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis node {self.nodes[i]} not {role} within {timeout_s} s")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def local_redis_cluster(
    data_dir: Path, masters: int = 3, replicas: int = 0, start_timeout_s: float = 30.0
) -> Iterator[LocalCluster]:
    """A local Redis Cluster of ``masters`` masters with ``replicas`` replicas
    each, made as an operator makes one: ``redis-server --cluster-enabled yes``
    per node, then ``redis-cli --cluster create``. Yields the running cluster
    (``.nodes``: the nodes' ``127.0.0.1:PORT``, masters first).

    Raises:
        FileNotFoundError: redis-server or redis-cli is not installed.
        RuntimeError: the cluster did not form within ``start_timeout_s``.
    """
    cli = shutil.which("redis-cli")
    if cli is None:
        raise FileNotFoundError("redis-cli is not installed (`make redis` installs it)")
    cluster = LocalCluster(data_dir, masters * (1 + replicas))
    try:
        for proc, port in zip(cluster.procs, cluster.ports, strict=True):
            wait_for_redis(proc, port, start_timeout_s)
        subprocess.run(
            [cli, "--cluster", "create", *cluster.nodes, "--cluster-replicas", str(replicas),
             "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=start_timeout_s,
        )  # fmt: skip
        wait_for_cluster(cluster.ports[0], masters, start_timeout_s)
        yield cluster
    finally:
        cluster.stop()
