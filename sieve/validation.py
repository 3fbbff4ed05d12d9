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
