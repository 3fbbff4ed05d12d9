"""Offline: a teacher DNN, a student distilled from it, ONNX export and INT8.

Needs torch (the ``offline`` extra). Every exported graph takes ``features``
float32 [batch, len(MODEL_FEATURES)] and returns ``score`` float32 [batch], the
probability that the user rates the item highly next; input standardisation is
inside the graph.

Training rows look like the rows the ranker scores. Each user's training history
is split in time once more: the earlier part gives the user and item features,
the towers, indexes and neighbours that give the candidates (every source, as
served), the later part labels them. A positive is a candidate the user went on
to rate highly.

- Teacher: DCN-v2 (full-rank cross layers) beside a deep tower, on the same
  features (Wang et al., 2021).
- Student: a small MLP (64-32), trained on the true labels and the teacher's
  logits together (Hinton et al., 2015) and on the teacher's order of each
  user's candidates, exported to ONNX and quantized to INT8 weights with ONNX
  Runtime.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ranker.evaluate import auc, ndcg_at_k
from ranker.features import MODEL_FEATURES
from ranker.funnel import OfflineFunnel
from ranker.sources import BIT, SOURCES

log = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "score"
ONNX_TOLERANCE = 5e-4
"""Largest |onnx - torch| accepted on the export check (probabilities in [0, 1]).
Float32 kernels differ in summation order, and by CPU (SIMD width), and the DCN's
cross layers multiply those differences; an export bug (a lost layer, wrong
weights or normalisation) moves scores by far more.
Up to 1.14e-4 seen on CI's CPU, where 1e-4 failed a build (BENCHMARKS.md, Quality)."""
INT8_TOLERANCE = 0.05
"""Largest |int8 - fp32| accepted on the quantization check."""
INPUT_CLIP = 5.0
"""Standardised features are clipped to +-this inside every model. Rare binary
features (a genre of 0.1% of items) standardise to 30 and more, and INT8's
dynamic quantization gives the whole input one uint8 scale per batch, which the
quantized layers read.
INT8 / FP32 NDCG@10 0.994 unclipped vs 1.001 clipped (BENCHMARKS.md, Quality)."""


@dataclass(frozen=True)
class Rows:
    x: np.ndarray  # float32 [n, F]
    y: np.ndarray  # float32 [n]
    group: np.ndarray  # int64 [n]: the user of each row
    recall: dict[str, float] = field(default_factory=dict)
    """Share of the users' later positives among the candidates, per source and in
    all (``recall_funnel``), and the learned order's NDCG@10 (validation figures)."""


def training_rows(
    users: pd.DataFrame,
    late: pd.DataFrame,
    funnel: OfflineFunnel,
    positive_rating: float,
    max_users: int,
    seed: int,
) -> Rows:
    """Candidate rows of up to ``max_users`` users, labelled by their later ratings.

    Each user's training history is split in time once more (``late`` is the later
    part): the earlier part gives the user table ``users`` (indexed by user id) and
    everything ``funnel`` serves from (towers, indexes, neighbours, item features),
    and the candidates come from ``funnel`` as the ranker draws them. A positive is a
    candidate the user went on to rate at least ``positive_rating``.
    """
    liked_later = late[late["rating"] >= positive_rating].groupby("userId")["movieId"]
    labelled = np.array([u for u in liked_later.groups if u in users.index], np.int64)
    rng = np.random.default_rng(seed)
    if len(labelled) > max_users:
        labelled = np.sort(rng.choice(labelled, max_users, replace=False))
    xs, ys, groups = [], [], []
    found: dict[str, list[float]] = {name: [] for name in ("funnel", "learned_ndcg@10", *SOURCES)}
    for user_id in labelled:
        u = users.loc[user_id]
        seen = np.sort(np.asarray(u["seen_item_ids"], np.int64))
        cand = funnel.candidates(u, seen)
        xs.append(funnel.inputs(u, cand))
        liked = liked_later.get_group(user_id).to_numpy()
        y = np.isin(cand.ids, liked)
        ys.append(y.astype(np.float32))
        groups.append(np.full(len(cand.ids), user_id, np.int64))
        n_liked = len(np.unique(liked))
        found["funnel"].append(float(y.sum()) / n_liked)
        for name in SOURCES:
            found[name].append(float((y & ((cand.sources & BIT[name]) > 0)).sum()) / n_liked)
        learned = cand.ids[cand.learned_rank >= 0]
        found["learned_ndcg@10"].append(ndcg_at_k(learned, {int(i) for i in liked}, 10))
    if not xs:
        raise ValueError("no user has a later positive rating to label training rows")
    recall = {
        (k if k.endswith("@10") else f"recall_{k}"): round(float(np.mean(v)), 4)
        for k, v in found.items()
    }
    return Rows(np.concatenate(xs), np.concatenate(ys), np.concatenate(groups), recall)


def _standardised(mean: np.ndarray, std: np.ndarray):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    class Scorer(nn.Module):
        """Standardises and clips its input; logits per row (forward: probabilities)."""

        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean))
            self.register_buffer("std", torch.from_numpy(std))

        def body(self, z: torch.Tensor) -> torch.Tensor:
            raise NotImplementedError

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.clamp((x - self.mean) / self.std, -INPUT_CLIP, INPUT_CLIP)
            return self.body(z).squeeze(-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return Scorer


def _tower(n_in: int, hidden: tuple[int, ...]):  # type: ignore[no-untyped-def]
    from torch import nn

    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers), width


def student_model(  # type: ignore[no-untyped-def]
    n_in: int, hidden: tuple[int, ...], cross_layers: int, mean: np.ndarray, std: np.ndarray
):
    """The served model: a small MLP, with ``cross_layers`` DCN-v2 cross layers
    beside it when > 0 (one costs n_in^2 multiply-adds per row). With the
    listwise term and the features of time the plain MLP keeps the teacher's
    NDCG@10 as well as one cross layer does, at less cost.
    1000 rows in 0.18 ms plain vs 0.29 ms with one cross layer (BENCHMARKS.md, Quality)."""
    if cross_layers > 0:
        return teacher_dcn(n_in, cross_layers, hidden, mean, std)
    return student_mlp(n_in, hidden, mean, std)


def student_mlp(n_in: int, hidden: tuple[int, ...], mean: np.ndarray, std: np.ndarray):  # type: ignore[no-untyped-def]
    """An MLP on the standardised features."""
    from torch import nn

    base = _standardised(mean, std)

    class Student(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            tower, width = _tower(n_in, hidden)
            self.net = nn.Sequential(tower, nn.Linear(width, 1))

        def body(self, z):  # type: ignore[no-untyped-def]
            return self.net(z)

    return Student()


def teacher_dcn(  # type: ignore[no-untyped-def]
    n_in: int, cross_layers: int, deep: tuple[int, ...], mean: np.ndarray, std: np.ndarray
):
    """DCN-v2, parallel form: x_{l+1} = x0 * (W_l x_l + b_l) + x_l beside a deep
    tower; a linear layer over both gives the logit."""
    import torch
    from torch import nn

    base = _standardised(mean, std)

    class Teacher(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.cross = nn.ModuleList([nn.Linear(n_in, n_in) for _ in range(cross_layers)])
            self.deep, width = _tower(n_in, deep)
            self.head = nn.Linear(n_in + width, 1)

        def body(self, z):  # type: ignore[no-untyped-def]
            xl = z
            for layer in self.cross:
                xl = z * layer(xl) + xl
            return self.head(torch.cat([xl, self.deep(z)], dim=-1))

    return Teacher()


def fit(  # type: ignore[no-untyped-def]
    model,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    seed: int,
    soft: np.ndarray | None = None,
    alpha: float = 0.5,
    top_weight: float = 0.0,
    lr: float = 2e-3,
    batch_size: int = 2048,
    group: np.ndarray | None = None,
    list_weight: float = 0.0,
    users_per_batch: int = 2,
) -> float:
    """Adam on BCE with a one-cycle schedule. With ``soft`` (the teacher's logits)
    the loss is ``(1 - alpha) * BCE(y) + alpha * MSE(logit, teacher logit)``:
    matching logits passes on the teacher's order among the many near-zero
    probabilities, which BCE on probabilities barely sees (positives are ~0.5% of
    rows). The MSE weighs the rows of the
    teacher's top 5% logits ``1 + top_weight`` times the rest: NDCG@10 is decided
    at the top of each list, and there the student must agree with the teacher
    most.

    With ``group`` (each row's user; a user's rows contiguous) a batch is
    ``users_per_batch`` whole users instead of ``batch_size`` random rows, and
    ``list_weight`` adds the listwise term of distillation: the KL divergence from
    the teacher's softmax over each user's candidates to the student's (ListNet's
    loss on the teacher's logits). It puts the weight where one user's top items
    are decided, rather than on rows across users.
    Student / teacher NDCG@10 0.960 without it vs 0.989 (BENCHMARKS.md, Quality).

    Returns the last epoch's mean loss."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    st = wt = None
    if soft is not None:
        st = torch.from_numpy(soft.astype(np.float32))
        w = 1.0 + top_weight * (soft >= np.quantile(soft, 0.95))
        wt = torch.from_numpy((w / w.mean()).astype(np.float32))
    if list_weight > 0 and (soft is None or group is None):
        raise ValueError("the listwise term needs the teacher's logits and each row's group")
    per_epoch, next_epoch = _epochs(len(xt), batch_size, group, users_per_batch, seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    mean_loss = 0.0
    model.train()
    for _ in range(epochs):
        total, steps = 0.0, 0
        for idx, seg in next_epoch():
            opt.zero_grad()
            logits = model.logits(xt[idx])
            loss = loss_fn(logits, yt[idx])
            if st is not None and wt is not None:
                mse = torch.mean(wt[idx] * (logits - st[idx]) ** 2)
                loss = (1 - alpha) * loss + alpha * mse
                if list_weight > 0:
                    loss = loss + list_weight * _listwise_kl(logits, st[idx], seg)
            loss.backward()
            opt.step()
            sched.step()
            total, steps = total + float(loss.item()), steps + 1
        mean_loss = total / max(steps, 1)
    model.eval()
    return mean_loss


def _epochs(  # type: ignore[no-untyped-def]
    n: int, batch_size: int, group: np.ndarray | None, users_per_batch: int, seed: int
):
    """(batches per epoch, a function of no argument giving the next epoch's
    batches): each a (row indices, sizes of the users' runs in them) pair. Rows are
    shuffled anew each epoch; with ``group``, whole users are, ``users_per_batch``
    to a batch."""
    import torch

    if group is None:
        gen = torch.Generator().manual_seed(seed)

        def rows() -> list[tuple[Any, list[int]]]:
            perm = torch.randperm(n, generator=gen)
            return [(perm[lo : lo + batch_size], []) for lo in range(0, n, batch_size)]

        return (n + batch_size - 1) // batch_size, rows
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    if len(np.unique(group)) != len(starts):
        raise ValueError("each user's rows must be contiguous")
    ends = np.r_[starts[1:], n]
    rng = np.random.default_rng(seed)

    def users() -> list[tuple[Any, list[int]]]:
        order = rng.permutation(len(starts))
        out = []
        for lo in range(0, len(order), users_per_batch):
            pick = order[lo : lo + users_per_batch]
            idx = np.concatenate([np.arange(starts[u], ends[u]) for u in pick])
            out.append((torch.from_numpy(idx), [int(ends[u] - starts[u]) for u in pick]))
        return out

    return (len(starts) + users_per_batch - 1) // users_per_batch, users


def _listwise_kl(logits, teacher, sizes: list[int]):  # type: ignore[no-untyped-def]
    """Mean over the users of KL(softmax(teacher) || softmax(student)) on their rows."""
    import torch

    total = logits.new_zeros(())
    for s, t in zip(torch.split(logits, sizes), torch.split(teacher, sizes), strict=True):
        p = torch.log_softmax(t, 0)
        total = total + torch.sum(p.exp() * (p - torch.log_softmax(s, 0)))
    return total / len(sizes)


def predict(model, x: np.ndarray, logits: bool = False, batch: int = 65536) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Probabilities (or logits) of ``model`` on rows ``x``."""
    import torch

    fn = model.logits if logits else model
    with torch.no_grad():
        parts = [fn(torch.from_numpy(x[lo : lo + batch])).numpy() for lo in range(0, len(x), batch)]
    return np.concatenate(parts)


@dataclass(frozen=True)
class ModelSpec:
    student_hidden: tuple[int, ...]
    student_cross_layers: int
    student_epochs: int
    teacher_cross_layers: int
    teacher_deep: tuple[int, ...]
    teacher_epochs: int
    distill_alpha: float
    distill_top_weight: float
    distill_list_weight: float
    seed: int


@dataclass
class TrainResult:
    """What ``train_and_export`` wrote and measured (validation: 10% of users)."""

    n_rows: int
    positive_share: float
    files: dict[str, str]  # teacher / student / student_int8 -> file name
    val_auc: dict[str, float] = field(default_factory=dict)
    onnx_max_abs_diff: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    feature_defaults: list[float] = field(default_factory=list)


def train_and_export(rows: Rows, out_dir: Path, spec: ModelSpec) -> TrainResult:
    """Train teacher, then student on the teacher's scores; export both to ONNX,
    quantize the student to INT8, check every file against its source.

    Raises:
        RuntimeError: an ONNX file differs from torch by more than
            ``ONNX_TOLERANCE``, or INT8 from FP32 by more than ``INT8_TOLERANCE``.
    """

    users = np.unique(rows.group)
    rng = np.random.default_rng(spec.seed)
    val_users = rng.choice(users, max(1, len(users) // 10), replace=False)
    val = np.isin(rows.group, val_users)
    x, y, group = rows.x[~val], rows.y[~val], rows.group[~val]
    mean = x.mean(axis=0).astype(np.float32)
    std = np.maximum(x.std(axis=0), 1e-6).astype(np.float32)
    n_in = x.shape[1]
    out = TrainResult(
        len(rows.x),
        float(rows.y.mean()),
        {"teacher": "teacher.onnx", "student": "ranker.onnx", "student_int8": "ranker_int8.onnx"},
        feature_defaults=[round(float(v), 6) for v in mean],
    )

    t0 = time.perf_counter()
    teacher = teacher_dcn(n_in, spec.teacher_cross_layers, spec.teacher_deep, mean, std)
    fit(teacher, x, y, spec.teacher_epochs, spec.seed)
    out.seconds["teacher"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    student = student_model(n_in, spec.student_hidden, spec.student_cross_layers, mean, std)
    soft = predict(teacher, x, logits=True)
    fit(
        student,
        x,
        y,
        spec.student_epochs,
        spec.seed,
        soft=soft,
        alpha=spec.distill_alpha,
        top_weight=spec.distill_top_weight,
        group=group if spec.distill_list_weight > 0 else None,
        list_weight=spec.distill_list_weight,
    )
    out.seconds["student"] = round(time.perf_counter() - t0, 2)

    # 512 real rows and 512 random ones in each feature's own scale
    noise = (mean + std * rng.normal(size=(512, n_in))).astype(np.float32)
    probe = np.concatenate([rows.x[rng.integers(0, len(rows.x), 512)], noise])
    for role, model in (("teacher", teacher), ("student", student)):
        path = out_dir / out.files[role]
        export_onnx(model, n_in, path)
        diff = onnx_vs_torch(model, path, probe)
        out.onnx_max_abs_diff[role] = diff
        if diff > ONNX_TOLERANCE:
            raise RuntimeError(f"ONNX export of {path} differs from torch by {diff:.2e}")
        out.val_auc[role] = auc(predict(model, rows.x[val]), rows.y[val].astype(bool))
    int8 = out_dir / out.files["student_int8"]
    quantize_int8(out_dir / out.files["student"], int8)
    diff = onnx_vs_onnx(out_dir / out.files["student"], int8, probe[:512])
    out.onnx_max_abs_diff["student_int8_vs_fp32"] = diff
    if diff > INT8_TOLERANCE:
        raise RuntimeError(f"INT8 model {int8} differs from FP32 by {diff:.3f}")
    out.val_auc["student_int8"] = auc(onnx_scores(int8, rows.x[val]), rows.y[val].astype(bool))
    return out


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


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """INT8 weights, activations quantized per batch at run time (ONNX Runtime's
    dynamic quantization: no calibration set, MatMul -> MatMulInteger), all but
    the tower's first layer and the output layer."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32_path))
    # the dynamo exporter's shape annotations trip the quantizer's type inference
    del model.graph.value_info[:]
    # The output layer keeps FP32 weights: its input joins the cross layer's
    # unbounded output and the tower's, and one uint8 scale would have to cover
    # both ranges. The tower's first layer (on the model's input, into a ReLU) keeps
    # FP32 too: candidates differ from each other by small steps of their ANN
    # score and popularity, finer than one uint8 step of the whole input's range.
    # INT8 / FP32 NDCG@10 0.934 output layer quantized, 0.990 first layer (BENCHMARKS.md, Quality).
    # The quantizer turns Gemm into MatMul + Add first, naming it <node>_MatMul.
    dense = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    feeds_relu = {i for n in model.graph.node if n.op_type == "Relu" for i in n.input}
    first = [n for n in dense if n.input[0] == dense[0].input[0] and n.output[0] in feeds_relu]
    keep_fp32 = [
        f"{n.name}_MatMul" if n.op_type == "Gemm" else n.name for n in [*first[:1], dense[-1]]
    ]
    tmp = int8_path.with_suffix(".prequant.onnx")
    onnx.save(model, str(tmp))
    try:
        quantize_dynamic(
            str(tmp),
            str(int8_path),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=keep_fp32,
        )
    finally:
        tmp.unlink(missing_ok=True)


def onnx_scores(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: Any = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})[0]
    return np.asarray(out)


def onnx_vs_torch(model, onnx_path: Path, x: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    """Largest absolute difference between torch and ONNX Runtime on rows ``x``."""
    return float(np.abs(onnx_scores(onnx_path, x) - predict(model, x)).max())


def onnx_vs_onnx(a: Path, b: Path, x: np.ndarray) -> float:
    return float(np.abs(onnx_scores(a, x) - onnx_scores(b, x)).max())


__all__ = [
    "MODEL_FEATURES",
    "ModelSpec",
    "Rows",
    "TrainResult",
    "train_and_export",
    "training_rows",
]
