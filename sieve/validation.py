"""Request checks shared by the services; each failure says what to change."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sieve.errors import InvalidRequest


def id_list(values: Sequence[int], limit: int, field: str) -> np.ndarray:
    """Positive ids, at most ``limit`` of them, as int64 [n].

    Raises:
        InvalidRequest: naming ``field``, the limit or the offending id.
    """
    if len(values) > limit:
        raise InvalidRequest(f"{field} holds {len(values)} ids, at most {limit}")
    ids = np.asarray(values, dtype=np.int64)
    if len(ids) and ids.min() <= 0:
        raise InvalidRequest(f"{field} must be positive, got {int(ids.min())}")
    return ids


def echo(value: str, width: int = 64) -> str:
    """``value`` quoted for an error message, as ASCII and cut to ``width`` characters.

    A status message travels in a trailer that clients cap (grpc: 8 KiB soft, 16 KiB
    hard, percent-encoded); echoing a long string the caller sent would turn the
    answer into the client's own RESOURCE_EXHAUSTED.
    """
    if len(value) <= width:
        return ascii(value)
    return f"{ascii(value[:width])}... ({len(value)} characters)"


def echo_list(values: Sequence[str], most: int = 5) -> str:
    """At most ``most`` of ``values``, each through ``echo``, as a list for a message."""
    shown = f"[{', '.join(echo(v) for v in values[:most])}]"
    return shown if len(values) <= most else f"{shown} and {len(values) - most} more"


def query_vector(values: Sequence[float], field: str) -> np.ndarray:
    """A query vector as float32 [d]: not empty, finite, and small enough that its
    inner products with unit vectors cannot overflow float32 (its squared L2 norm
    fits a float32; a normalised vector's is 1).

    Raises:
        InvalidRequest: naming ``field`` and what is wrong with it.
    """
    vector = np.asarray(values, dtype=np.float32)
    if len(vector) == 0:
        raise InvalidRequest(f"{field} is empty")
    if not np.isfinite(vector).all():
        raise InvalidRequest(f"{field} holds NaN or infinity")
    wide = vector.astype(np.float64)
    if float(wide @ wide) > float(np.finfo(np.float32).max):
        raise InvalidRequest(
            f"{field} is too large: its squared L2 norm overflows float32, and so would "
            "its scores (send an L2-normalised vector)"
        )
    return vector
