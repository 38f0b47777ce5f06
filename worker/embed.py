"""ArcFace embeddings on ONNX Runtime: aligned 112x112 chips in, L2-normalised vectors out."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from worker.models import RemoteFetcher, resolve_model
from worker.runtime import onnx_session

if TYPE_CHECKING:
    import onnxruntime as ort

    from worker.settings import PipelineSettings
    from worker.types import ModelInfo

logger = logging.getLogger(__name__)


class ArcFaceEmbedder:
    """An ArcFace ONNX model (`w600k_mbf` by default); one call per batch of chips."""

    def __init__(
        self,
        session: ort.InferenceSession,
        model: ModelInfo,
        batch_size: int,
        *,
        fixed_batch: bool | None = None,
    ) -> None:
        self.session = session
        self.model = model
        self.batch_size = max(1, batch_size)
        # On a GPU every new batch shape costs the CUDA provider a round of kernel set-up
        # (measured on an H200: 931 faces in variable batches took 21 s, in full ones 2.3 s),
        # while padding a batch costs almost nothing there: pad every batch to `batch_size`.
        # On the CPU padding would be paid in full, so batches keep their size.
        if fixed_batch is None:
            fixed_batch = session.get_providers()[0] == "CUDAExecutionProvider"
        self.fixed_batch = fixed_batch
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = session.get_outputs()[0].name
        self.input_size = (int(inp.shape[2]), int(inp.shape[3]))
        self.dim = int(session.get_outputs()[0].shape[-1])

    @classmethod
    def load(
        cls, settings: PipelineSettings, *, fetch: RemoteFetcher | None = None
    ) -> ArcFaceEmbedder:
        """The embedder the settings name, its file resolved and sha256-checked."""
        model = resolve_model(
            settings.embedder,
            override=settings.embedder_path,
            override_sha256=settings.embedder_sha256,
            cache_dir=settings.model_cache_dir,
            fetch=fetch,
        )
        return cls(onnx_session(model.path, settings), model, settings.embed_batch_size)

    def embed(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Embeddings (n, dim) of aligned RGB chips (n, 112, 112, 3), each of unit length."""
        if len(chips) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = np.empty((len(chips), self.dim), np.float32)
        for start in range(0, len(chips), self.batch_size):
            batch = chips[start : start + self.batch_size]
            out[start : start + len(batch)] = self._predict(batch)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def _predict(self, chips: NDArray[np.uint8]) -> NDArray[np.float32]:
        # ArcFace's training input: RGB, (x - 127.5) / 127.5, NCHW.
        count = len(chips)
        if self.fixed_batch and count < self.batch_size:
            pad = np.zeros((self.batch_size - count, *chips.shape[1:]), chips.dtype)
            chips = np.concatenate([chips, pad])
        blob = (chips.astype(np.float32) - 127.5) / 127.5
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        (features,) = self.session.run([self.output_name], {self.input_name: blob})
        return np.asarray(features, np.float32)[:count]
