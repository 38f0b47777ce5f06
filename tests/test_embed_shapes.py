"""The embedder reads its chip size and vector length from the model: another size works,
an input it cannot read is refused at load with a message that says what to export."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from worker.embed import ArcFaceEmbedder
from worker.errors import ModelError
from worker.scrfd import anchor_centres
from worker.types import ModelInfo

MODEL = ModelInfo(name="custom", role="embedder", path="/models/custom.onnx", sha256="0" * 64)


class FakeSession:
    """An ONNX Runtime session that declares `input_shape` and `output_shape` and returns, per
    chip, its mean scaled pixel followed by zeros (so tests can see the scaling applied)."""

    def __init__(self, input_shape: list[Any], output_shape: list[Any], dim: int = 0) -> None:
        self.input_shape, self.output_shape = input_shape, output_shape
        self.dim = dim or output_shape[-1]
        self.seen: list[tuple[int, ...]] = []

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="data", shape=self.input_shape)]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="fc", shape=self.output_shape)]

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]

    def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        blob = feed["data"]
        self.seen.append(blob.shape)
        out = np.zeros((len(blob), self.dim), np.float32)
        out[:, 0] = blob.reshape(len(blob), -1).mean(axis=1)
        out[:, 1] = 1.0
        return [out]


def test_a_model_of_another_size_works() -> None:
    session = FakeSession(["batch", 3, 128, 128], ["batch", 256])
    embedder = ArcFaceEmbedder(session, MODEL, 4, mean=0.0, std=255.0)  # type: ignore[arg-type]
    assert (embedder.chip_size, embedder.dim) == (128, 256)
    chips = np.full((5, 128, 128, 3), 255, np.uint8)
    vectors = embedder.embed(chips)
    assert vectors.shape == (5, 256)
    assert session.seen == [(4, 3, 128, 128), (1, 3, 128, 128)]
    # The registry's scaling was applied: (255 - 0) / 255 = 1 before normalising.
    np.testing.assert_allclose(vectors[:, :2], np.full((5, 2), np.sqrt(0.5)), atol=1e-6)
    assert embedder.embed(np.zeros((0, 128, 128, 3), np.uint8)).shape == (0, 256)


def test_chips_of_the_wrong_size_are_refused() -> None:
    embedder = ArcFaceEmbedder(FakeSession([None, 3, 112, 112], [None, 512]), MODEL, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"align them at its chip_size"):
        embedder.embed(np.zeros((2, 128, 128, 3), np.uint8))


@pytest.mark.parametrize(
    ("input_shape", "output_shape", "message"),
    [
        (["n", 112, 112, 3], ["n", 512], "expected \\(batch, 3, size, size\\)"),
        (["n", 3, "h", "w"], ["n", 512], "fixed square NCHW input"),
        (["n", 3, 112, 96], ["n", 512], "fixed square NCHW input"),
        (["n", 3, 112, 112], ["n", "d"], "fixed embedding dimension"),
    ],
)
def test_a_model_whose_shapes_cannot_be_read_is_refused(
    input_shape: list[Any], output_shape: list[Any], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        ArcFaceEmbedder(FakeSession(input_shape, output_shape, 512), MODEL, 8)  # type: ignore[arg-type]


def test_a_model_that_gives_other_than_it_declares_is_refused() -> None:
    session = FakeSession(["n", 3, 112, 112], ["n", 512], dim=128)
    embedder = ArcFaceEmbedder(session, MODEL, 8)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="gave 128 values per face, declared 512"):
        embedder.embed(np.zeros((1, 112, 112, 3), np.uint8))


def test_scrfd_anchor_centres_are_cached_per_input_size() -> None:
    first = anchor_centres(20, 15, 32, 2)
    assert anchor_centres(20, 15, 32, 2) is first
    assert anchor_centres(25, 15, 32, 2) is not first
    assert not first.flags.writeable


def test_every_model_loads_and_predicts_the_same_way() -> None:
    """One lifecycle: each model class is built by the base's `load(settings, fetch=...)` (no
    class has a `load` of its own) and runs through `predict`, its domain verb's other name."""
    from worker.models import InferenceModel
    from worker.mtcnn import MTCNNDetector
    from worker.onet import ONetVerifier
    from worker.scrfd import SCRFDDetector

    verbs = {
        SCRFDDetector: "detect",
        MTCNNDetector: "detect",
        ONetVerifier: "face_probability",
        ArcFaceEmbedder: "embed",
    }
    for cls, verb in verbs.items():
        assert issubclass(cls, InferenceModel)
        assert "load" not in vars(cls) and "_load" in vars(cls)
        assert cls.predict is getattr(cls, verb)


def test_an_album_without_faces_has_vectors_of_the_models_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vector length comes from the embedder, also where no face tells it: an album whose
    photos have no face, or cannot be read, has (0, dim) embeddings for a 256-d model."""
    import io

    from PIL import Image

    from worker.pipeline import group_album
    from worker.settings import PipelineSettings
    from worker.types import Detections, PhotoSource, PhotoStatus

    class NoFaces:
        name, models = "none", [MODEL]

        def detect(self, image: np.ndarray) -> Detections:
            return Detections.empty()

    embedder = ArcFaceEmbedder(FakeSession([None, 3, 112, 112], [None, 256]), MODEL, 8)  # type: ignore[arg-type]
    monkeypatch.setattr("worker.pipeline.load_detector", lambda settings, fetch: NoFaces())
    monkeypatch.setattr("worker.pipeline.load_embedder", lambda settings, fetch: embedder)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 200)).save(buf, "JPEG")
    photos = [
        PhotoSource(id="sky", name="sky.jpg", read=lambda: buf.getvalue()),
        PhotoSource(id="bad", name="bad.jpg", read=lambda: b"not a photo"),
    ]
    seen: list[tuple[PhotoStatus, tuple[int, ...]]] = []
    result = group_album(
        photos,
        PipelineSettings(),
        on_photo=lambda photo: seen.append((photo.status, photo.embeddings.shape)),
    )
    assert result.embeddings.shape == (0, 256)
    assert seen == [(PhotoStatus.OK, (0, 256)), (PhotoStatus.UNSUPPORTED, (0, 256))]
    assert group_album([], PipelineSettings()).embeddings.shape == (0, 256)
