"""ONNX Runtime against torch (the oracle), and the scorer's load-time checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranker.features import MODEL_FEATURES
from ranker.scorer import OnnxScorer
from ranker.train import INPUT_NAME, OUTPUT_NAME, _mlp, export_onnx, onnx_vs_torch
from sieve.errors import ArtifactError


def _model(n: int):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return _mlp(
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
