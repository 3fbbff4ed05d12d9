"""Whether ONNX Runtime can score on CUDA here: the provider counts only when a
session really starts with it and answers (``sieve.device``).

``get_available_providers()`` lists CUDA on any host with onnxruntime-gpu
installed; a session asked for CUDA without a driver, the CUDA 13 runtime or
cuDNN 9 quietly runs on the CPU provider instead. The probe asks for CUDA, reads
``get_providers()`` after creation, and runs a tiny model.
"""

from __future__ import annotations

import base64
import ctypes
import functools

import numpy as np

from sieve.device import Probe

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

PROBE_MODEL = base64.b64decode(
    "CAgSBXNpZXZlOnEKEQoBeAoBdxIBeSIGTWF0TXVsEgVwcm9iZSorCAQIAhABQgF3SiAAAAAAAACAPwAAAEAAAEBA"
    "AACAQAAAoEAAAMBAAADgQFoTCgF4Eg4KDAgBEggKAggBCgIIBGITCgF5Eg4KDAgBEggKAggBCgIIAkIECgAQDQ=="
)
"""y = x @ w, x float [1, 4], w = arange(8).reshape(4, 2), opset 13, IR 8: a
MatMul (cuBLAS on CUDA), as the scoring model's layers are. Rebuilt with
``onnx.helper`` and compared by ``tests/unit/ranker/test_device.py``; serialized
here because the serving path does not import ``onnx``."""
PROBE_ANSWER = np.array([[12.0, 16.0]], np.float32)  # ones(1, 4) @ w


def providers(on_gpu: bool) -> list[str]:
    """The providers a scoring session asks for: CUDA first (CPU for the nodes CUDA
    lacks) when the probe passed, else the CPU alone, so a CPU host does not log
    ONNX Runtime's failure to create CUDA for every session."""
    return [CUDA, CPU] if on_gpu else [CPU]


@functools.cache
def onnx_cuda() -> Probe:
    """Probe CUDA for ONNX Runtime, once per process: the build has the provider,
    the driver loads, the CUDA and cuDNN libraries of the gpu extra's nvidia wheels
    preload, and a session asked for CUDA gets it and answers right."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return Probe(
            False,
            "this ONNX Runtime build has no CUDA provider (onnxruntime, the cpu extra)",
            gpu_build=False,
        )
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return Probe(
            False,
            "there is no NVIDIA driver for onnxruntime-gpu (libcuda.so.1 does not load)",
        )
    preload = getattr(ort, "preload_dlls", None)  # the nvidia-* wheels' CUDA 13, cuDNN 9
    try:
        if preload is not None:
            preload()
        session = ort.InferenceSession(PROBE_MODEL, providers=[CUDA, CPU])
        got = session.get_providers()
        if not got or got[0] != CUDA:
            return Probe(
                False,
                f"ONNX Runtime could not start its CUDA provider (a session asked for CUDA "
                f"got {got}; it needs the CUDA 13 runtime and cuDNN 9, which the gpu extra's "
                "nvidia wheels bring, and a driver >= 580; its own log line says which "
                "library failed)",
            )
        out = session.run(None, {"x": np.ones((1, 4), np.float32)})[0]
    except Exception as e:  # ORT raises its own untyped errors
        return Probe(False, f"a test session on CUDA failed: {e}")
    if not np.allclose(out, PROBE_ANSWER):
        return Probe(
            False, f"a test session on CUDA answered {out.tolist()}, not {PROBE_ANSWER.tolist()}"
        )
    return Probe(True, f"a session on {CUDA} answered a test run (onnxruntime {ort.__version__})")
