"""Hot reload of the candidate index: no failed call during a swap, bad sets refused."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from candidate.service import create_server as create_candidate
from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
from sieve import artifacts
from sieve.config import CandidateConfig
from tests.conftest import copy_artifacts


def clone_version(root: Path, src: str, new: str) -> Path:
    """A new version folder with the same files (a rebuilt set would look the same)."""
    folder = root / "versions" / new
    shutil.copytree(root / "versions" / src, folder)
    manifest = json.loads((folder / artifacts.MANIFEST).read_text())
    manifest["version"] = new
    artifacts.write_manifest(folder, manifest)
    return folder


class Calls:
    """Concurrent Retrieve loops that record every answer's version and every error."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.versions: list[str] = []
        self.errors: list[grpc.aio.AioRpcError] = []
        self._stop = asyncio.Event()
        self._reached = asyncio.Event()
        self._target = 0

    async def loop(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            stub = sieve_pb2_grpc.CandidateServiceStub(ch)
            while not self._stop.is_set():
                try:
                    r = await stub.Retrieve(sieve_pb2.RetrieveRequest(user_id=7, k=200))
                    assert len(r.item_ids) == 200
                    self.versions.append(r.artifact_version)
                except grpc.aio.AioRpcError as e:
                    self.errors.append(e)
                if len(self.versions) >= self._target:
                    self._reached.set()

    async def until(self, n: int) -> None:
        """Wait until ``n`` answers have arrived in total."""
        self._target = n
        self._reached.clear()
        if len(self.versions) < n:
            await self._reached.wait()

    def stop(self) -> None:
        self._stop.set()


async def test_swap_under_concurrent_calls_then_refuse_a_corrupt_set(
    artifacts_root: Path, tmp_path: Path
) -> None:
    root = copy_artifacts(artifacts_root, tmp_path)
    v1 = artifacts.current_version(root)
    server, servicer = await create_candidate(CandidateConfig(port=0, reload_check_s=0), root)
    calls = Calls(f"127.0.0.1:{server.port}")
    workers = [asyncio.create_task(calls.loop()) for _ in range(8)]
    try:
        await calls.until(40)
        assert not await servicer.reload()  # nothing new yet

        clone_version(root, v1, "zz_v2")
        artifacts.publish(root, "zz_v2")
        assert await servicer.reload()
        swapped_at = len(calls.versions)
        await calls.until(swapped_at + 80)

        # a corrupt set: the index no longer matches its checksum
        bad = clone_version(root, "zz_v2", "zz_v3")
        (bad / "index.faiss").write_bytes(b"\x00" * 64)
        artifacts.publish(root, "zz_v3")
        assert not await servicer.reload()
        assert not await servicer.reload()  # refused once, not retried in a loop
        refused_at = len(calls.versions)
        await calls.until(refused_at + 40)
    finally:
        calls.stop()
        await asyncio.gather(*workers)

    assert calls.errors == []
    assert calls.versions[0] == v1 and set(calls.versions) == {v1, "zz_v2"}
    # calls in flight during the swap may finish on v1; none that started after it
    assert set(calls.versions[swapped_at + 8 :]) == {"zz_v2"}
    assert servicer.version == "zz_v2"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        status = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    await server.stop(0)
