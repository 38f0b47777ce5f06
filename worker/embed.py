"""ArcFace embeddings on OpenVINO (CPU) or ONNX Runtime: aligned chips in, L2-normalised
vectors out.

The chip size and the vector length are read from the model (its declared input and output
shapes), the pixel scaling from its registry entry: an operator's model of another size works,
and one whose shapes cannot be read says so at load instead of being fed the wrong input.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from worker.errors import ModelError
from worker.models import REGISTRY, InferenceModel
from worker.runtime import embedder_session

if TYPE_CHECKING:
    import onnxruntime as ort

    from worker.models import ModelFiles
    from worker.runtime import OpenVINOSession
    from worker.settings import PipelineSettings
    from worker.types import ModelInfo

logger = logging.getLogger(__name__)


DEFAULT_MEAN = 127.5
DEFAULT_STD = 127.5
"""ArcFace's training input scaling, (x - 127.5) / 127.5, for models the registry lacks."""


def _declared_dim(value: object) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


class ArcFaceEmbedder(InferenceModel[[NDArray[np.uint8]], NDArray[np.float32]]):
    """An ArcFace ONNX model (`w600k_mbf` by default); one call per batch of chips."""

    def __init__(
        self,
        session: ort.InferenceSession | OpenVINOSession,
        model: ModelInfo,
        batch_size: int,
        *,
        fixed_batch: bool | None = None,
        mean: float = DEFAULT_MEAN,
        std: float = DEFAULT_STD,
    ) -> None:
        self.session = session
        self.model = model
        self.batch_size = max(1, batch_size)
        self.mean, self.std = mean, std
        # On a GPU every new batch shape costs the CUDA provider a round of kernel set-up
        # (measured on an H200: 931 faces in variable batches took 21 s, in full ones 2.3 s),
        # while padding a batch costs almost nothing there: pad every batch to `batch_size`.
        # On the CPU padding would be paid in full, so batches keep their size.
        if fixed_batch is None:
            fixed_batch = session.get_providers()[0] == "CUDAExecutionProvider"
        self.fixed_batch = fixed_batch
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
        self.input_name = inp.name
        self.output_name = out.name
        shape = list(inp.shape)
        dims = [_declared_dim(d) for d in shape[1:]]
        if len(shape) != 4 or dims[0] != 3 or dims[1] is None or dims[1] != dims[2]:
            raise ModelError(
                f"embedder {model.path} takes input {inp.name} of shape {shape}; expected "
                "(batch, 3, size, size) RGB chips, e.g. (None, 3, 112, 112): export the model "
                "with a fixed square NCHW input"
            )
        self.chip_size = int(dims[1])
        dim = _declared_dim(list(out.shape)[-1]) if out.shape else None
        if dim is None:
            raise ModelError(
                f"embedder {model.path} does not declare its output size ({out.name} has shape "
                f"{out.shape}); export it with a fixed embedding dimension"
            )
        self.dim = dim

    @classmethod
    def _load(cls, settings: PipelineSettings, files: ModelFiles) -> ArcFaceEmbedder:
        """The embedder the settings name, its file resolved and sha256-checked."""
        model = files.resolve(
            settings.embedder,
            override=settings.embedder_path,
            override_sha256=settings.embedder_sha256,
        )
        # Pixel scaling is a property of how the model was trained: the registry entry of
        # `settings.embedder` says it (also for a file given by AFTERTRIP_EMBEDDER_PATH).
        spec = REGISTRY.get(settings.embedder)
        return cls(
            embedder_session(model, settings),
            model,
            settings.embed_batch_size,
            mean=spec.input_mean if spec else DEFAULT_MEAN,
            std=spec.input_std if spec else DEFAULT_STD,
        )

    def embed(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Embeddings (n, dim) of aligned RGB chips (n, size, size, 3), each of unit length."""
        if len(chips) == 0:
            return np.zeros((0, self.dim), np.float32)
        if chips.shape[1:] != (self.chip_size, self.chip_size, 3):
            raise ValueError(
                f"chips of shape {chips.shape[1:]} for a model taking "
                f"({self.chip_size}, {self.chip_size}, 3): align them at its chip_size"
            )
        out = np.empty((len(chips), self.dim), np.float32)
        for start in range(0, len(chips), self.batch_size):
            batch = chips[start : start + self.batch_size]
            out[start : start + len(batch)] = self._predict(batch)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    predict = embed

    def _predict(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        # The model's training input: RGB, (x - mean) / std, NCHW.
        count = len(chips)
        if self.fixed_batch and count < self.batch_size:
            pad = np.zeros((self.batch_size - count, *chips.shape[1:]), chips.dtype)
            chips = np.concatenate([chips, pad])
        blob = (chips.astype(np.float32) - self.mean) / self.std
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        (features,) = self.session.run([self.output_name], {self.input_name: blob})
        features = np.asarray(features, np.float32).reshape(len(blob), -1)[:count]
        if features.shape[1] != self.dim:
            raise ModelError(
                f"embedder {self.model.path} gave {features.shape[1]} values per face, "
                f"declared {self.dim}"
            )
        return features
