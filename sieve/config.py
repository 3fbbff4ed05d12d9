"""The base of every configuration model.

Each stage keeps its own models beside its code (``candidate/config.py``,
``features/config.py``, ``ranker/config.py``); the top floor (``app/config.py``)
assembles them into ``SieveConfig``, the model of ``sieve.toml``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Frozen, and refusing unknown keys (``extra="forbid"``), so a typo in
    ``sieve.toml`` fails at start with the key's name instead of being ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")
