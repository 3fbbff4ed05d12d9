"""The learned retriever's user tower in ONNX Runtime, run per request: the user's
vector from the learned vectors of their last items, so a new rating changes the
next Rank's candidates without a rebuild. The stored vector (the build's run of
the same tower) is the fallback rung (``stored_user_vector``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sieve.errors import ArtifactError
from sieve.manifest import RetrieverSection


class UserTower:
    """One ONNX Runtime session on one thread; ``vector`` takes [m, dim] vectors of
    the user's last items (oldest first) and returns the user's [dim] vector."""

    def __init__(self, path: str, section: RetrieverSection) -> None:
        self.path = path
        self.section = section
        self._session: Any = None

    def load(self) -> None:
        """Open the session and check its inputs fit the manifest.

        Raises:
            ArtifactError: an unreadable model, or inputs that do not match.
        """
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own untyped errors for bad files
            raise ArtifactError(f"user tower {self.path} is not a loadable ONNX model: {e}") from e
        s = self.section
        names = [i.name for i in session.get_inputs()]
        if names != [s.history_input, s.mask_input]:
            raise ArtifactError(
                f"user tower {self.path} has inputs {names}, the manifest expects "
                f"{[s.history_input, s.mask_input]}"
            )
        shape = session.get_inputs()[0].shape
        if len(shape) != 3 or shape[1] != s.history or shape[2] != s.dim:
            raise ArtifactError(
                f"user tower {self.path} takes history of shape {shape}, the manifest "
                f"says [batch, {s.history}, {s.dim}]"
            )
        self._session = session
        self.vector(np.zeros((1, s.dim), np.float32))  # the first run is slow

    def vector(self, recent_vectors: np.ndarray) -> np.ndarray:
        """The user's vector from the vectors of their last items (at least one)."""
        s = self.section
        recent = np.asarray(recent_vectors, np.float32)[-s.history :]
        hist = np.zeros((1, s.history, s.dim), np.float32)
        mask = np.zeros((1, s.history), np.float32)
        if len(recent):
            hist[0, s.history - len(recent) :] = recent
            mask[0, s.history - len(recent) :] = 1.0
        out = self._session.run([s.output], {s.history_input: hist, s.mask_input: mask})[0]
        return np.asarray(out[0], np.float32)
