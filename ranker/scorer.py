"""The scoring stage: the ranking model in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ranker.device import CPU, CUDA
from sieve.errors import ArtifactError


def replace_nonfinite(x: np.ndarray, defaults: np.ndarray) -> int:
    """Replace NaN and infinity in rows ``x`` [n, F] by the column's default, in place.

    Returns:
        How many values were replaced.
    """
    bad = ~np.isfinite(x)
    n = int(bad.sum())
    if n:
        x[bad] = np.broadcast_to(defaults, x.shape)[bad]
    return n


class OnnxScorer:
    """One ONNX Runtime session; ``score`` takes [n, F] float32 and returns [n].

    Thread policy is set deliberately (see DESIGN.md): ``intra_op_threads``
    threads, no spinning, so the scorer does not fight Faiss for the cores.
    """

    def __init__(
        self,
        path: str,
        input_name: str,
        output_name: str,
        features: Sequence[str],
        intra_op_threads: int,
        providers: Sequence[str] = (CPU,),
    ) -> None:
        self.path = path
        self.providers = list(providers)  # asked for (ranker.device.providers)
        self.input_name = input_name
        self.output_name = output_name
        self.features = list(features)
        self.intra_op_threads = intra_op_threads
        self._session: object | None = None

    def load(self) -> None:
        """Open the session and check the model fits the manifest's feature schema.

        Raises:
            ArtifactError: unreadable model, or inputs/outputs that do not match,
                naming the mismatch.
        """
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(self.path, opts, providers=self.providers)
        except Exception as e:  # ORT raises its own untyped errors for bad files
            raise ArtifactError(f"model file {self.path} is not a loadable ONNX model: {e}") from e
        got = session.get_providers()
        if self.providers[0] == CUDA and got[0] != CUDA:  # the probe passed, this model not
            raise ArtifactError(
                f"model file {self.path} did not start on CUDA (ONNX Runtime gave {got}); "
                "the GPU passed its test at start-up, so the model's operators are the suspect"
            )
        inputs = session.get_inputs()
        if [i.name for i in inputs] != [self.input_name]:
            raise ArtifactError(
                f"model file {self.path} has inputs {[i.name for i in inputs]}, "
                f"the manifest expects [{self.input_name!r}]"
            )
        shape, dtype = inputs[0].shape, inputs[0].type
        if len(shape) != 2 or shape[1] != len(self.features) or dtype != "tensor(float)":
            raise ArtifactError(
                f"model file {self.path} takes {dtype} {shape}; the manifest's feature schema "
                f"has {len(self.features)} float features {self.features}"
            )
        if self.output_name not in [o.name for o in session.get_outputs()]:
            raise ArtifactError(f"model file {self.path} has no output {self.output_name!r}")
        self._session = session

    def score(self, x: np.ndarray) -> np.ndarray:
        """Scores float32 [n] for rows x float32 [n, F].

        Raises:
            RuntimeError: the model returned a number of scores other than n.
        """
        if self._session is None:
            raise RuntimeError("OnnxScorer.score before load()")
        out = self._session.run([self.output_name], {self.input_name: x})[0]  # type: ignore[attr-defined]
        out = np.asarray(out, dtype=np.float32).reshape(-1)
        if len(out) != len(x):
            raise RuntimeError(f"model returned {len(out)} scores for {len(x)} rows")
        return out
