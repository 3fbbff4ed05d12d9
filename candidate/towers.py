"""Offline: the learned retriever, a two-tower model trained with in-batch sampled
softmax and logQ correction (Covington et al., 2016; Yi et al., 2019).

Needs torch (the ``offline`` extra); the serving path reads only what it writes:
the item vectors (the candidate index's space), the users' vectors (the fallback
rung) and the user tower in ONNX, which the ranker runs at request time.

- Item tower: the item's MiniLM text embedding, a learned id embedding, its genres
  and log popularity -> MLP -> L2-normalised vector of ``dim``. The id embedding is
  dropped (replaced by the shared "unknown" row) for a share of the items in every
  batch, so an item nobody rated yet, which gets the unknown row, still has a
  useful vector from its text.
- User tower: the item vectors of the user's last ``history`` rated items (oldest
  first, left-padded), pooled with learned per-position weights (recency), beside
  the last item's vector -> MLP -> L2-normalised vector. Its input is item vectors,
  so a new rating changes the user's vector at the next request without a rebuild.
- Training: each rating of a user at or above ``target_rating`` (by default every
  rating) is a target, the user's ratings before it the history. A batch's other targets are the
  negatives; their logits lose log q(item) (the item's share of targets), which
  undoes the popularity bias of in-batch negatives.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

HISTORY_INPUT = "history"
MASK_INPUT = "mask"
USER_OUTPUT = "user_vector"
ONNX_TOLERANCE = 1e-4
"""Largest |onnx - torch| accepted on the user tower's export check (unit vectors)."""


@dataclass(frozen=True)
class TowerSpec:
    dim: int = 64
    history: int = 50
    epochs: int = 10
    temperature: float = 0.05
    id_dim: int = 32
    hidden: int = 256
    id_dropout: float = 0.5
    batch_size: int = 1024
    lr: float = 2e-3
    max_samples: int = 2_000_000
    max_steps: int = 2000
    target_rating: float = 0.0
    seed: int = 0


@dataclass
class Towers:
    """What training produced, all in catalog order."""

    item_vectors: np.ndarray  # float32 [n_items, dim], L2-normalised
    user_ids: np.ndarray  # int64 [n_users]
    user_vectors: np.ndarray  # float32 [n_users, dim]: the user tower on the full history
    recent: list[np.ndarray]  # per user, the last ``history`` item ids, oldest first
    samples: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    model: Any = None  # the torch module (for the export)


def sequences(train: pd.DataFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """userId -> (movieIds, ratings) in time order (ties by movieId)."""
    ordered = train.sort_values(["userId", "timestamp", "movieId"], kind="stable")
    users = ordered["userId"].to_numpy()
    cuts = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    items = ordered["movieId"].to_numpy(np.int64)
    ratings = ordered["rating"].to_numpy(np.float32)
    return {
        int(users[lo]): (items[lo:hi], ratings[lo:hi])
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)
    }


def _model(  # type: ignore[no-untyped-def]
    text: np.ndarray, genres: np.ndarray, log_pop: np.ndarray, spec: TowerSpec
):
    import torch
    from torch import nn
    from torch.nn import functional as F

    n_items = len(text)

    class TwoTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("text", torch.from_numpy(np.ascontiguousarray(text, np.float32)))
            self.register_buffer("genres", torch.from_numpy(genres.astype(np.float32)))
            pop = (log_pop / max(float(log_pop.max()), 1.0)).astype(np.float32)
            self.register_buffer("pop", torch.from_numpy(pop)[:, None])
            self.ids = nn.Embedding(n_items + 1, spec.id_dim)  # the last row: unknown
            nn.init.normal_(self.ids.weight, std=0.05)
            width = text.shape[1] + spec.id_dim + genres.shape[1] + 1
            self.item = nn.Sequential(
                nn.Linear(width, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, spec.dim)
            )
            self.position = nn.Parameter(torch.zeros(spec.history))
            self.user = nn.Sequential(
                nn.Linear(2 * spec.dim, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, spec.dim)
            )

        def items(self, rows, id_rows):  # type: ignore[no-untyped-def]
            x = torch.cat(
                [self.text[rows], self.ids(id_rows), self.genres[rows], self.pop[rows]], -1
            )
            return F.normalize(self.item(x), dim=-1)

        def forward(self, history, mask):  # type: ignore[no-untyped-def]
            """The user tower: history [B, N, dim] (oldest first), mask [B, N] (1 real)."""
            w = torch.softmax(self.position + (mask - 1.0) * 1e9, -1) * mask
            pooled = (w.unsqueeze(-1) * history).sum(1)
            return F.normalize(self.user(torch.cat([pooled, history[:, -1]], -1)), dim=-1)

    return TwoTower()


def _pad(rows: np.ndarray, n: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full(n, fill, np.int64)
    mask = np.zeros(n, np.float32)
    h = rows[-n:] if n else rows[:0]
    if len(h):
        out[n - len(h) :] = h
        mask[n - len(h) :] = 1.0
    return out, mask


def train_towers(
    train: pd.DataFrame,
    item_ids: np.ndarray,
    text: np.ndarray,
    genres: np.ndarray,
    spec: TowerSpec,
) -> Towers:
    """Train the two towers on ``train`` and compute every item's and user's vector.

    Args:
        item_ids: the catalog's ids; row i of ``text`` and ``genres`` is item i.
    """
    import torch
    from torch.nn import functional as F

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    n_items = len(item_ids)
    row_of = pd.Series(np.arange(n_items), index=item_ids)
    seqs = sequences(train)
    rated = train["movieId"].to_numpy(np.int64)
    counts = np.bincount(row_of.loc[rated].to_numpy(), minlength=n_items)
    model = _model(text, genres, np.log1p(counts), spec)
    known = counts > 0  # items with training ratings keep their own id row

    hist, masks, targets = [], [], []
    for items, ratings in seqs.values():
        rows = row_of.loc[items].to_numpy()
        for t in np.flatnonzero(ratings >= spec.target_rating):
            if t == 0:
                continue
            h, m = _pad(rows[:t], spec.history, 0)
            hist.append(h)
            masks.append(m)
            targets.append(rows[t])
    if not targets:
        raise ValueError("no target rating follows another: nothing to train the towers on")
    H, M, T = np.stack(hist), np.stack(masks), np.asarray(targets, np.int64)
    if len(T) > spec.max_samples:
        keep = np.sort(rng.choice(len(T), spec.max_samples, replace=False))
        H, M, T = H[keep], M[keep], T[keep]
    share = np.bincount(T, minlength=n_items).astype(np.float64)
    log_q = torch.from_numpy(np.log(np.maximum(share, 1.0) / share.sum()).astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    steps = (len(T) + spec.batch_size - 1) // spec.batch_size
    # a large catalog's many samples need fewer passes: the step budget bounds the time
    epochs = max(1, min(spec.epochs, spec.max_steps // steps))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.lr, total_steps=epochs * steps)
    losses = []
    model.train()
    for _ in range(epochs):
        total = 0.0
        perm = rng.permutation(len(T))
        for lo in range(0, len(T), spec.batch_size):
            b = perm[lo : lo + spec.batch_size]
            tgt = torch.from_numpy(T[b])
            hist_b = torch.from_numpy(H[b])
            # every item of the batch through the item tower once
            uniq, inv = torch.unique(torch.cat([tgt, hist_b.reshape(-1)]), return_inverse=True)
            id_rows = torch.where(
                torch.from_numpy(known)[uniq] & (torch.rand(len(uniq)) >= spec.id_dropout),
                uniq,
                torch.full_like(uniq, n_items),
            )
            vecs = model.items(uniq, id_rows)
            t_inv, h_inv = inv[: len(b)], inv[len(b) :].reshape(len(b), spec.history)
            u = model(vecs[h_inv], torch.from_numpy(M[b]))
            t_uniq, t_col = torch.unique(t_inv, return_inverse=True)
            logits = u @ vecs[t_uniq].T / spec.temperature - log_q[uniq[t_uniq]][None]
            loss = F.cross_entropy(logits, t_col)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.item())
        losses.append(round(total / steps, 4))
        log.info("two-tower epoch %d/%d: loss %.4f", len(losses), epochs, losses[-1])
    model.eval()
    item_vectors = item_vectors_of(model, known)
    user_ids = np.asarray(sorted(seqs), np.int64)
    recent = [seqs[int(u)][0][-spec.history :] for u in user_ids]
    user_vectors = user_vectors_of(model, item_vectors, row_of, recent, spec.history)
    return Towers(
        item_vectors=item_vectors,
        user_ids=user_ids,
        user_vectors=user_vectors,
        recent=recent,
        samples=len(T),
        seconds=round(time.perf_counter() - t0, 2),
        losses=losses,
        model=model,
    )


def item_vectors_of(model, known: np.ndarray, batch: int = 65536) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Every catalog item's vector; items without training ratings use the unknown id."""
    import torch

    n = len(known)
    out = np.empty((n, model.item[-1].out_features), np.float32)
    with torch.no_grad():
        for lo in range(0, n, batch):
            rows = torch.arange(lo, min(lo + batch, n))
            id_rows = torch.where(torch.from_numpy(known[lo : lo + batch]), rows, n)
            out[lo : lo + len(rows)] = model.items(rows, id_rows).numpy()
    return out


def history_inputs(
    item_vectors: np.ndarray, rows: list[np.ndarray], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The user tower's inputs for histories given as catalog rows (oldest first):
    float32 [B, n, dim] item vectors, left-padded with zeros, and the [B, n] mask."""
    dim = item_vectors.shape[1]
    hist = np.zeros((len(rows), n, dim), np.float32)
    mask = np.zeros((len(rows), n), np.float32)
    for i, r in enumerate(rows):
        r = r[-n:]
        if len(r):
            hist[i, n - len(r) :] = item_vectors[r]
            mask[i, n - len(r) :] = 1.0
    return hist, mask


def user_vectors_of(  # type: ignore[no-untyped-def]
    model, item_vectors: np.ndarray, row_of: pd.Series, recent: list[np.ndarray], n: int
) -> np.ndarray:
    import torch

    out = np.empty((len(recent), item_vectors.shape[1]), np.float32)
    with torch.no_grad():
        for lo in range(0, len(recent), 4096):
            part = [row_of.loc[r].to_numpy() for r in recent[lo : lo + 4096]]
            h, m = history_inputs(item_vectors, part, n)
            out[lo : lo + len(part)] = model(torch.from_numpy(h), torch.from_numpy(m)).numpy()
    return out


def export_user_tower(model, spec: TowerSpec, path: Path) -> float:  # type: ignore[no-untyped-def]
    """The user tower to ONNX (dynamic batch), checked against torch on random
    histories; returns the largest difference.

    Raises:
        RuntimeError: ONNX differs from torch by more than ``ONNX_TOLERANCE``.
    """
    import warnings

    import onnxruntime as ort
    import torch

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    h = torch.zeros(2, spec.history, spec.dim)
    m = torch.ones(2, spec.history)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        # both inputs share the batch axis, which the exporter says at length
        warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
        program = torch.onnx.export(
            model,
            (h, m),
            dynamo=True,
            input_names=[HISTORY_INPUT, MASK_INPUT],
            output_names=[USER_OUTPUT],
            dynamic_shapes=({0: batch}, {0: batch}),
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    rng = np.random.default_rng(spec.seed)
    hist = rng.normal(size=(64, spec.history, spec.dim)).astype(np.float32)
    mask = (rng.random((64, spec.history)) < 0.7).astype(np.float32)
    mask[:, -1] = 1.0
    mask[0] = 0.0
    mask[0, -1] = 1.0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([USER_OUTPUT], {HISTORY_INPUT: hist, MASK_INPUT: mask})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(hist), torch.from_numpy(mask)).numpy()
    diff = float(np.abs(np.asarray(got) - want).max())
    if diff > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX export of the user tower {path} differs from torch by {diff:.2e}")
    return diff
