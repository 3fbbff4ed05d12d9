"""Where the ranking model scores: a device counts only when a test on it passes
(``sieve.device.decide``, ``ranker.device.onnx_cuda``). The gpu extra on a host
without a GPU has its own test (tests/gpu_extra, ``make test-gpu-extra``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from ranker.config import RankerConfig
from ranker.device import CPU, CUDA, PROBE_ANSWER, PROBE_MODEL, onnx_cuda, providers
from ranker.pipeline import RankPipeline
from sieve.device import Probe, decide
from sieve.errors import ConfigError


def test_the_probe_model_is_the_matmul_it_says_it_is() -> None:
    import onnx
    import onnx.helper as h
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "w")
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"])],
        "probe",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)], producer_name="sieve")
    model.ir_version = 8
    onnx.checker.check_model(model)
    assert model.SerializeToString() == PROBE_MODEL
    got = ort.InferenceSession(PROBE_MODEL, providers=[CPU]).run(
        None, {"x": np.ones((1, 4), np.float32)}
    )[0]
    np.testing.assert_array_equal(got, PROBE_ANSWER)


def _no_cuda_provider() -> bool:
    import onnxruntime as ort

    return CUDA not in ort.get_available_providers()


@pytest.mark.skipif(not _no_cuda_provider(), reason="onnxruntime-gpu here: tests/gpu_extra")
def test_the_cpu_extra_has_no_cuda_and_says_which_package() -> None:
    found = onnx_cuda()
    assert not found.usable
    assert "no CUDA provider" in found.detail and "cpu extra" in found.detail
    assert providers(False) == [CPU] and providers(True) == [CUDA, CPU]


def test_decide_cpu_never_probes() -> None:
    def probe() -> Probe:
        raise AssertionError("device 'cpu' must not probe")

    assert decide("ranker.device", "cpu", probe, "score batching off") is False


def test_decide_gpu_without_a_usable_device_refuses_naming_why() -> None:
    why = "there is no NVIDIA driver (libcuda.so.1 does not load)"
    with pytest.raises(ConfigError, match=r"ranker.device is 'gpu' but there is no NVIDIA driver"):
        decide("ranker.device", "gpu", lambda: Probe(False, why), "score batching off")


def test_decide_auto_falls_back_saying_why_and_what_changes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    why = "Faiss sees no GPU"
    with caplog.at_level(logging.INFO, logger="sieve.device"):
        assert (
            decide("candidate.device", "auto", lambda: Probe(False, why), "batching off") is False
        )
        assert decide("candidate.device", "auto", lambda: Probe(True, "GPU 0 of 1"), "") is True
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "candidate.device = 'auto': on the CPU, no usable GPU (Faiss sees no GPU); batching off",
        "candidate.device = 'auto': on the GPU (GPU 0 of 1)",
    ]
    assert caplog.records[0].levelno == logging.WARNING  # a GPU build that cannot run
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sieve.device"):
        cpu_extra = Probe(False, "this Faiss build has no GPU support", gpu_build=False)
        assert decide("candidate.device", "auto", lambda: cpu_extra, "batching off") is False
    assert caplog.records[0].levelno == logging.INFO  # the cpu extra: the expected path


@pytest.mark.skipif(not _no_cuda_provider(), reason="onnxruntime-gpu here: tests/gpu_extra")
def test_the_ranker_on_a_cpu_host_scores_on_the_cpu_unbatched(tmp_path: Path) -> None:
    pipeline = RankPipeline(RankerConfig(), tmp_path)
    assert pipeline.on_gpu is False and pipeline.score_batcher is None
    assert RankPipeline(RankerConfig(score_batching="on"), tmp_path).score_batcher is not None
    with pytest.raises(ConfigError, match="ranker.device is 'gpu' but this ONNX Runtime build"):
        RankPipeline(RankerConfig(device="gpu"), tmp_path)
