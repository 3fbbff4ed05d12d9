"""Whether Faiss can search on a GPU here: a GPU counts only when a search on it
answers what the CPU answers (``sieve.device``)."""

from __future__ import annotations

import functools

import faiss
import numpy as np

from sieve.device import Probe

CUDA_DRIVER_HINT = "the gpu extra is built for CUDA 13, which needs an NVIDIA driver >= 580"


@functools.cache
def faiss_gpu(gpu_id: int = 0) -> Probe:
    """Probe GPU ``gpu_id`` for Faiss: the build has GPU support, it sees the device,
    and an exact top-4 over 256 vectors on it matches ``IndexFlatIP`` on the CPU.
    Probed once per process and id."""
    if not hasattr(faiss, "StandardGpuResources"):
        return Probe(
            False, "this Faiss build has no GPU support (faiss-cpu, the cpu extra)", gpu_build=False
        )
    n = int(faiss.get_num_gpus())
    if n == 0:
        return Probe(False, f"Faiss sees no GPU (no NVIDIA device or driver; {CUDA_DRIVER_HINT})")
    if gpu_id >= n:
        return Probe(False, f"gpu_id is {gpu_id} and Faiss sees {n} GPU(s)")
    x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
    cpu = faiss.IndexFlatIP(16)
    cpu.add(x)
    _, want = cpu.search(x[:8], 4)
    try:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = gpu_id
        gpu = faiss.GpuIndexFlatIP(res, 16, cfg)
        gpu.add(x)
        _, got = gpu.search(x[:8], 4)
    except RuntimeError as e:  # Faiss raises RuntimeError for CUDA failures
        return Probe(False, f"a test search on GPU {gpu_id} failed: {e} ({CUDA_DRIVER_HINT})")
    if not np.array_equal(got, want):
        return Probe(False, f"a test search on GPU {gpu_id} disagreed with the CPU's")
    return Probe(True, f"GPU {gpu_id} of {n}: a test search matched the CPU's")
