"""Face detection: one small interface and a factory over the two detectors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.typing import NDArray

from worker.types import Detections

if TYPE_CHECKING:
    from worker.models import RemoteFetcher
    from worker.settings import PipelineSettings
    from worker.types import ModelInfo


class FaceDetector(Protocol):
    """Finds faces in an RGB image (H, W, 3 uint8) and returns them in its pixels."""

    name: str
    models: list[ModelInfo]

    def detect(self, image: NDArray[np.uint8]) -> Detections:
        """Faces in `image`, best score first."""
        ...


def box_iou(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float64]:
    """Pairwise IoU (n, m) of boxes a (n, 4) and b (m, 4), x1 y1 x2 y2; 0 for empty boxes."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(
    boxes: NDArray[np.float32], scores: NDArray[np.float32], iou: float, mode: str = "union"
) -> NDArray[np.intp]:
    """Indices of boxes kept by greedy non-maximum suppression, best score first.

    mode "union" divides the overlap by the union (IoU); "min" by the smaller box (MTCNN's
    last stage uses it to drop a box that sits inside another).
    """
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.intp)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        if mode == "min":
            overlap = inter / np.maximum(np.minimum(areas[i], areas[rest]), 1e-9)
        else:
            overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, np.intp)


class FaceVerifier(Protocol):
    """Gives a second opinion on detected boxes: the probability that each is a face."""

    model: ModelInfo

    def face_probability(
        self, image: NDArray[np.uint8], boxes: NDArray[np.float32]
    ) -> NDArray[np.float32]:
        """Face probability (n,) of each box (n, 4) in `image`."""
        ...


class VerifiedDetector:
    """A detector whose faces must also convince a verifier (at least `threshold`)."""

    def __init__(self, inner: FaceDetector, verifier: FaceVerifier, threshold: float) -> None:
        self.inner = inner
        self.verifier = verifier
        self.threshold = threshold
        self.name = inner.name
        self.models = [*inner.models, verifier.model]

    def detect(self, image: NDArray[np.uint8]) -> Detections:
        """The inner detector's faces that the verifier accepts."""
        found = self.inner.detect(image)
        if len(found) == 0:
            return found
        keep = self.verifier.face_probability(image, found.boxes) >= self.threshold
        return found if keep.all() else found.select(keep)


def load_detector(
    settings: PipelineSettings, *, fetch: RemoteFetcher | None = None
) -> FaceDetector:
    """The detector the settings name, with its weights resolved and verified."""
    from worker.mtcnn import MTCNNDetector, ONetVerifier

    if settings.detector == "scrfd":
        from worker.scrfd import SCRFDDetector

        scrfd = SCRFDDetector.load(settings, fetch=fetch)
        if settings.verify_threshold <= 0:
            return scrfd
        return VerifiedDetector(scrfd, ONetVerifier.load(settings), settings.verify_threshold)
    # MTCNN's own last stage is ONet: a second look would add nothing.
    return MTCNNDetector.load(settings)


def face_size(boxes: NDArray[np.float32]) -> NDArray[np.float32]:
    """Each face's size in pixels: the longer side of its box (what `min_face_size` limits)."""
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def finish_detections(
    found: Detections, *, width: int, height: int, min_face_size: int
) -> Detections:
    """Boxes clipped to the image, faces smaller than `min_face_size` dropped, best score first."""
    boxes = found.boxes.astype(np.float32, copy=True)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    clipped = Detections(boxes, found.scores.astype(np.float32), found.landmarks.astype(np.float32))
    clipped = clipped.select(face_size(clipped.boxes) >= min_face_size)
    return clipped.select(np.argsort(-clipped.scores, kind="stable"))
