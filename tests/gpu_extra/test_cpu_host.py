"""The gpu extra on a host without a usable GPU (CI): ``make test-gpu-extra``.

Runs in ``.venv-gpu`` (faiss-gpu-cuvs, onnxruntime-gpu with the CUDA 13 wheels, no
torch) with ``--noconftest``: the suite's fixtures build with torch. The set under
``SIEVE_GPU_EXTRA_ARTIFACTS`` was built by the cpu extra. What must hold: the GPU
runtimes are the ones imported, the probes find no usable device and say why, both
services start on the CPU paths with batching off and say so once, ``device =
"gpu"`` refuses to start, and ``benchmarks.gpu`` runs with its GPU parts skipped.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
SET = Path(os.environ.get("SIEVE_GPU_EXTRA_ARTIFACTS", ROOT / ".gpu-extra" / "artifacts"))
SIEVE = [sys.executable, "-m", "app.cli"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None
    or "faiss-gpu-cuvs" not in {d.metadata["Name"] for d in md.distributions()},
    reason="run by `make test-gpu-extra` in .venv-gpu (the gpu extra installed)",
)


def _has_gpu() -> bool:
    import faiss

    return int(faiss.get_num_gpus()) > 0


no_gpu = pytest.mark.skipif(_has_gpu(), reason="this host has a GPU: benchmarks.gpu measures it")


def test_the_gpu_extra_brings_its_runtimes_and_no_torch() -> None:
    import faiss
    import onnxruntime as ort

    names = {d.metadata["Name"].lower() for d in md.distributions()}
    assert {
        "faiss-gpu-cuvs",
        "onnxruntime-gpu",
        "nvidia-cudnn-cu13",
        "nvidia-cuda-runtime",
    } <= names
    assert not {"faiss-cpu", "onnxruntime"} & names  # one provider of each module
    assert faiss.__version__ == md.version("faiss-gpu-cuvs") == "1.15.1"
    assert hasattr(faiss, "StandardGpuResources")
    # the misleading signal this extra always gives, driver or not
    assert "CUDAExecutionProvider" in ort.get_available_providers()
    assert importlib.util.find_spec("torch") is None  # the serving path runs without it


@no_gpu
def test_the_probes_find_no_usable_gpu_and_say_why() -> None:
    from candidate.device import faiss_gpu
    from ranker.device import onnx_cuda

    faiss_found, ort_found = faiss_gpu(0), onnx_cuda()
    assert not faiss_found.usable and "Faiss sees no GPU" in faiss_found.detail
    assert not ort_found.usable and "libcuda.so.1" in ort_found.detail


@no_gpu
def test_onnxruntime_gpu_without_cuda_keeps_score_batching_off(tmp_path: Path) -> None:
    """Before ranker.device, ``get_available_providers()`` listing CUDA turned score
    batching on here while every session ran on the CPU provider."""
    from ranker.config import RankerConfig
    from ranker.pipeline import RankPipeline
    from sieve.errors import ConfigError

    pipeline = RankPipeline(RankerConfig(), tmp_path)
    assert pipeline.on_gpu is False
    assert pipeline.score_batcher is None
    with pytest.raises(ConfigError, match="ranker.device is 'gpu' but there is no NVIDIA driver"):
        RankPipeline(RankerConfig(device="gpu"), tmp_path)


@contextlib.contextmanager
def _serving(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    ready, log = tmp_path / "ready", tmp_path / "serve.log"
    cmd = [*SIEVE, "serve", "--artifacts", str(SET), "--candidate-port", "0",
           "--ranker-port", "0", "--ready-file", str(ready)]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sieve serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        time.sleep(0.1)
        ports = dict(line.split() for line in ready.read_text().splitlines())
        yield proc, log, int(ports["ranker"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@no_gpu
def test_both_services_start_on_the_cpu_paths_and_rank(tmp_path: Path) -> None:
    from protos.sieve.v1 import sieve_pb2, sieve_pb2_grpc
    from sieve import artifacts

    aset = artifacts.load(SET)
    user_ids = pd.read_parquet(aset.verified("user_features"), columns=["user_id"])
    with _serving(tmp_path) as (_, log, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = sieve_pb2_grpc.RankerServiceStub(ch)
            answers = [
                stub.Rank(sieve_pb2.RankRequest(user_id=int(u), k=50), timeout=30)
                for u in user_ids["user_id"].head(20)
            ]
        text = log.read_text()
    assert all(len(a.items) == 50 for a in answers)
    assert any(not a.rungs for a in answers), [list(a.rungs) for a in answers]
    # where each stage runs, said once, with the reason and what the CPU path changes
    candidate_line = "candidate.device = 'auto': on the CPU, no usable GPU (Faiss sees no GPU"
    ranker_line = (
        "ranker.device = 'auto': on the CPU, no usable GPU (there is no NVIDIA driver for "
        "onnxruntime-gpu (libcuda.so.1 does not load)); score batching off"
    )
    assert text.count(candidate_line) == 1 and "); retrieve batching off" in text
    assert text.count(ranker_line) == 1
    assert "searched on CPU" in text
    # no scoring session asks ONNX Runtime for a CUDA it cannot have
    assert "Failed to create CUDAExecutionProvider" not in text


@no_gpu
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("candidate", "candidate.device is 'gpu' but Faiss sees no GPU"),
        ("ranker", "ranker.device is 'gpu' but there is no NVIDIA driver for onnxruntime-gpu"),
    ],
)
def test_device_gpu_refuses_to_start_without_one(tmp_path: Path, table: str, message: str) -> None:
    config = tmp_path / "sieve.toml"
    config.write_text(f'[{table}]\ndevice = "gpu"\n')
    cmd = [*SIEVE, "--config", str(config), "serve", "--artifacts", str(SET), "--only", table,
           f"--{table}-port", "0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"sieve serve: {message}" in done.stderr


def test_benchmarks_gpu_runs_and_marks_the_gpu_parts_skipped(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--artifacts", str(SET), "--quick",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert (tmp_path / "gpu.png").stat().st_size > 10_000
    assert result["probes"]["faiss"]["usable"] is _has_gpu()
    assert result["exact"]["cpu"]["alone_ms"]["n"] == 64
    if not _has_gpu():
        for part in (result["exact"]["gpu"], result["ivf_clone"]["gpu"], result["scoring"],
                     result["latency"]):  # fmt: skip
            assert part["skipped"].startswith("no usable GPU: "), part
        assert result["summary"][0].startswith("exact GPU recall 1.0: SKIPPED (no usable GPU")
    else:
        assert result["exact"]["gpu"]["recall"] == pytest.approx(1.0)


def test_benchmarks_gpu_on_generated_vectors_needs_no_set(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--vectors", "20000", "--quick",
           "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["exact"]["items"] == 20000 and result["exact"]["dim"] == 64
    assert result["ivf_clone"]["cpu"]["recall"] > 0.9  # the learned space's default index
    assert result["scoring"]["skipped"].startswith("--vectors")
    assert result["artifact_version"] is None
