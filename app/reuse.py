"""Whether an artifact set already built can stand in for a fresh build."""

from __future__ import annotations

from app.config import BuildConfig
from ranker.features import MODEL_FEATURES
from sieve.manifest import ModelSection


def model_differs(model: ModelSection, build: BuildConfig | None = None) -> str:
    """What of a set's manifest ``model`` differs from what a build with ``build``
    (default: the default config) makes now: the features this code computes and
    the student's shape (``hidden``, ``cross_layers``).

    A field the manifest does not name differs even where the model's default
    equals today's value (a set written before ``cross_layers`` existed was not
    built by today's code).

    Returns:
        The differing field names, comma-separated; "" when nothing differs.
    """
    build = build or BuildConfig()
    now = {
        "features": tuple(MODEL_FEATURES),
        "hidden": tuple(build.hidden),
        "cross_layers": build.student_cross_layers,
    }
    return ", ".join(
        k for k, v in now.items() if k not in model.model_fields_set or getattr(model, k) != v
    )
