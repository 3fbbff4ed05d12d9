"""Offline: train the first ranking model (a small MLP) and export it to ONNX.

Needs torch (the ``offline`` extra). The exported graph takes ``features``
float32 [batch, len(MODEL_FEATURES)] and returns ``score`` float32 [batch], the
probability of a positive rating; input standardisation is inside the graph.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ranker.features import MODEL_FEATURES, assemble

log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "score"
ONNX_TOLERANCE = 1e-5
"""Largest |onnx - torch| accepted on the export check (probabilities in [0, 1])."""


@dataclass(frozen=True)
class TrainResult:
    n_rows: int
    positive_share: float
    final_loss: float
    onnx_max_abs_diff: float


def training_rows(
    train: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    item_embeddings: np.ndarray,
    positive_rating: float,
    negatives_per_positive: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 [n, F], y float32 [n]) from training interactions.

    Rated items are labelled by ``rating >= positive_rating``; for every positive,
    ``negatives_per_positive`` unrated items are sampled uniformly as negatives,
    like the unseen candidates the model ranks at serving time.
    """
    rng = np.random.default_rng(seed)
    user_row = pd.Series(np.arange(len(users)), index=users["user_id"].to_numpy())
    item_row = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    u = user_row.loc[train["userId"].to_numpy()].to_numpy()
    i = item_row.loc[train["movieId"].to_numpy()].to_numpy()
    y = (train["rating"].to_numpy() >= positive_rating).astype(np.float32)
    n_neg = int(y.sum()) * negatives_per_positive
    neg_u = rng.choice(u[y == 1], size=n_neg)
    neg_i = rng.integers(0, len(items), size=n_neg)
    seen = set(zip(u.tolist(), i.tolist(), strict=True))
    keep = np.array([(a, b) not in seen for a, b in zip(neg_u, neg_i, strict=True)], dtype=bool)
    u = np.concatenate([u, neg_u[keep]])
    i = np.concatenate([i, neg_i[keep]])
    y = np.concatenate([y, np.zeros(int(keep.sum()), np.float32)])

    user_vec = np.stack(users["user_vector"].to_numpy())
    item_emb = item_embeddings  # row i is items.iloc[i]
    x = assemble(
        ann_score=np.einsum("ij,ij->i", user_vec[u], item_emb[i]),
        user_genre_affinity=np.stack(users["genre_affinity"].to_numpy())[u],
        item_genres=np.stack(items["genres"].to_numpy())[i],
        item_log_popularity=items["log_popularity"].to_numpy()[i],
        item_rating_mean=items["rating_mean"].to_numpy()[i],
        user_rating_count=users["rating_count"].to_numpy()[u],
        user_rating_mean=users["rating_mean"].to_numpy()[u],
    )
    return x, y


def _mlp(n_in: int, hidden: tuple[int, ...], mean: np.ndarray, std: np.ndarray):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Ranker(nn.Module):
        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean))
            self.register_buffer("std", torch.from_numpy(std))
            layers: list[nn.Module] = []
            width = n_in
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, 1))
            self.net = nn.Sequential(*layers)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std).squeeze(-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return Ranker()


def train_and_export(
    x: np.ndarray,
    y: np.ndarray,
    out_path: Path,
    hidden: tuple[int, ...],
    epochs: int,
    seed: int,
    batch_size: int = 1024,
) -> TrainResult:
    """Train the MLP with BCE, export it to ONNX and check ONNX against torch.

    Raises:
        RuntimeError: ONNX Runtime's outputs differ from torch's by more than
            ``ONNX_TOLERANCE`` on random or real rows.
    """
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    mean = x.mean(axis=0).astype(np.float32)
    std = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
    model = _mlp(x.shape[1], hidden, mean, std)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for lo in range(0, len(xt), batch_size):
            idx = perm[lo : lo + batch_size]
            opt.zero_grad()
            loss = loss_fn(model.logits(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    export_onnx(model, x.shape[1], out_path)
    rng = np.random.default_rng(seed)
    probe = np.concatenate(
        [x[rng.integers(0, len(x), 512)], rng.normal(size=(512, x.shape[1])).astype(np.float32)]
    )
    diff = onnx_vs_torch(model, out_path, probe)
    if diff > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX export of {out_path} differs from torch by {diff:.2e}")
    return TrainResult(len(x), float(y.mean()), float(loss.item()), diff)


def export_onnx(model, n_features: int, out_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Export with the dynamo exporter, dynamic batch size, one file (no external data)."""
    import torch

    # torch's exporter warns about torchvision ops we do not use, and about its own
    # internals; neither says anything about this model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    example = torch.zeros(4, n_features)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(out_path), external_data=False)


def onnx_vs_torch(model, onnx_path: Path, x: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    """Largest absolute difference between torch and ONNX Runtime on rows ``x``."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float(np.abs(got - expected).max())


__all__ = ["MODEL_FEATURES", "TrainResult", "train_and_export", "training_rows"]
