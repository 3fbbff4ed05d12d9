"""ONNX Runtime against torch (the oracle), and the scorer's load-time checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranker.features import MODEL_FEATURES
from ranker.scorer import OnnxScorer
from ranker.train import (
    INPUT_NAME,
    ONNX_TOLERANCE,
    OUTPUT_NAME,
    export_onnx,
    onnx_scores,
    onnx_vs_torch,
    quantize_int8,
    student_mlp,
    student_model,
    teacher_dcn,
)
from sieve.errors import ArtifactError


def _model(n: int):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return student_mlp(
        n,
        (16, 8),
        rng.normal(size=n).astype(np.float32),
        rng.uniform(0.5, 2, size=n).astype(np.float32),
    ).eval()


def test_onnx_matches_torch_on_random_rows(tmp_path: Path) -> None:
    n = len(MODEL_FEATURES)
    model = _model(n)
    path = tmp_path / "m.onnx"
    export_onnx(model, n, path)
    rng = np.random.default_rng(1)
    for batch in (1, 7, 1000):
        x = (3 * rng.normal(size=(batch, n))).astype(np.float32)
        assert onnx_vs_torch(model, path, x) < 1e-5


def _stats(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=n).astype(np.float32), rng.uniform(0.5, 2, size=n).astype(np.float32)


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_dcn_models_match_torch_on_random_rows(tmp_path: Path, kind: str) -> None:
    import torch

    torch.manual_seed(0)
    n = len(MODEL_FEATURES)
    mean, std = _stats(n)
    model = (
        teacher_dcn(n, 3, (64, 32, 16), mean, std)
        if kind == "teacher"
        else student_model(n, (16, 8), 1, mean, std)
    ).eval()
    path = tmp_path / f"{kind}.onnx"
    export_onnx(model, n, path)
    x = (3 * np.random.default_rng(4).normal(size=(1000, n))).astype(np.float32)
    assert onnx_vs_torch(model, path, x) < ONNX_TOLERANCE


@pytest.mark.parametrize(
    ("cross_layers", "n_quantized", "kept_fp32", "quantized"),
    [
        # one cross layer: it and the tower's second layer are quantized; the
        # tower's first layer and the output layer keep FP32 weights
        (1, 2, {"deep.0.weight", "head.weight"}, {"cross.0.weight", "deep.2.weight"}),
        # the default plain MLP: only the tower's second layer is quantized, its
        # first layer (on the model's input) and the output stay FP32
        (0, 1, {"net.0.0.weight", "net.1.weight"}, {"net.0.2.weight"}),
    ],
)
def test_int8_student_is_quantized_where_it_should_be_and_close_to_fp32(
    tmp_path: Path, cross_layers: int, n_quantized: int, kept_fp32: set[str], quantized: set[str]
) -> None:
    import onnx
    import torch

    torch.manual_seed(0)
    n = len(MODEL_FEATURES)
    mean, std = _stats(n)
    model = student_model(n, (64, 32), cross_layers, mean, std).eval()
    fp32, int8 = tmp_path / "s.onnx", tmp_path / "s8.onnx"
    export_onnx(model, n, fp32)
    quantize_int8(fp32, int8)
    graph = onnx.load(str(int8)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulInteger") == n_quantized and ops.count("MatMul") == 2
    fp32_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert kept_fp32 <= fp32_weights
    assert not quantized & fp32_weights
    x = np.random.default_rng(5).normal(size=(1000, n)).astype(np.float32)
    a, b = onnx_scores(fp32, x), onnx_scores(int8, x)
    assert np.abs(a - b).max() < 0.05
    # the order is what ranking uses: INT8 keeps most of FP32's top 50
    assert len(set(np.argsort(-a)[:50]) & set(np.argsort(-b)[:50])) >= 40
    assert not int8.with_suffix(".prequant.onnx").exists()


def test_scorer_scores_like_torch(tmp_path: Path) -> None:
    import torch

    n = len(MODEL_FEATURES)
    model = _model(n)
    path = tmp_path / "m.onnx"
    export_onnx(model, n, path)
    scorer = OnnxScorer(str(path), INPUT_NAME, OUTPUT_NAME, list(MODEL_FEATURES), 1)
    scorer.load()
    x = np.random.default_rng(2).normal(size=(1000, n)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(scorer.score(x), want, atol=1e-5)


def test_model_with_other_inputs_is_refused_naming_the_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "five.onnx"
    export_onnx(_model(5), 5, path)
    scorer = OnnxScorer(str(path), INPUT_NAME, OUTPUT_NAME, list(MODEL_FEATURES), 1)
    with pytest.raises(ArtifactError, match=r"five.onnx takes tensor\(float\) \[.*5\]"):
        scorer.load()
    wrong_name = OnnxScorer(str(path), "rows", OUTPUT_NAME, ["a"] * 5, 1)
    with pytest.raises(ArtifactError, match="the manifest expects \\['rows'\\]"):
        wrong_name.load()


def test_garbage_model_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="bad.onnx is not a loadable ONNX model"):
        OnnxScorer(str(path), INPUT_NAME, OUTPUT_NAME, list(MODEL_FEATURES), 1).load()


def test_replace_nonfinite_uses_column_defaults() -> None:
    from ranker.scorer import replace_nonfinite

    x = np.array([[1.0, np.nan, 3.0], [np.inf, 5.0, -np.inf]], np.float32)
    n = replace_nonfinite(x, np.array([10.0, 20.0, 30.0], np.float32))
    assert n == 3
    np.testing.assert_array_equal(x, [[1.0, 20.0, 3.0], [10.0, 5.0, 30.0]])
    assert replace_nonfinite(x, np.zeros(3, np.float32)) == 0


def test_score_batch_splits_per_request_and_never_mixes_models(tmp_path: Path) -> None:
    from ranker.stages import score_batch

    n = len(MODEL_FEATURES)
    scorers = []
    other = student_mlp(n, (4,), np.zeros(n, np.float32), np.ones(n, np.float32)).eval()
    for i, seed_model in enumerate((_model(n), other)):
        path = tmp_path / f"m{i}.onnx"
        export_onnx(seed_model, n, path)
        s = OnnxScorer(str(path), INPUT_NAME, OUTPUT_NAME, list(MODEL_FEATURES), 1)
        s.load()
        scorers.append(s)
    rng = np.random.default_rng(0)
    items = [
        (scorers[i % 2], rng.normal(size=(int(rng.integers(1, 50)), n)).astype(np.float32))
        for i in range(7)
    ]
    got = score_batch(items)
    assert len(got) == len(items)
    for (scorer, x), scores in zip(items, got, strict=True):
        np.testing.assert_allclose(scores, scorer.score(x), atol=1e-6)
