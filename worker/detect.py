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


class SecondLook:
    """A detector that, finding no face in a photo, looks again: first at the photo framed by
    a black border of `margin` times its longer side, then (with `rotated`) at the photo turned
    a quarter clockwise and counter-clockwise. Second looks keep upright faces only.

    A face that fills the frame or is cut off by it (close-ups, selfies) can outgrow SCRFD's
    largest anchors; framed, it is smaller in the detector's input and whole. Faces lying on
    their side (someone on a beach towel, a tilted selfie) are not found upright by either
    detector. Photos with a face cost nothing more; photos without one (scenery) cost three
    more detections.

    `close_ups` (for MTCNN): a face that reaches the photo's edge and spans half its shorter
    side is looked at again framed, and taken from there. MTCNN regresses landmarks inside its
    box, so a box cut by the frame squeezes them (tight K-pop crops: BCubed F1 0.36 without,
    0.995 with); SCRFD's are fine as they are (0.997, and 0.988 when re-looked).
    """

    def __init__(
        self, inner: FaceDetector, *, margin: float, rotated: bool, close_ups: bool = False
    ) -> None:
        self.inner = inner
        self.margin = margin
        self.rotated = rotated
        self.close_ups = close_ups and margin > 0
        self.name = inner.name
        self.models = inner.models

    def detect(self, image: NDArray[np.uint8]) -> Detections:
        """The inner detector's faces; if none, those the second looks find, in the photo's
        pixels. With `close_ups`, a face cut off by the frame is looked at again framed."""
        found = self.inner.detect(image)
        height, width = image.shape[:2]
        if len(found):
            if self.close_ups and close_up(found.boxes, width, height).any():
                return self._replace_close_ups(found, self._framed(image), width, height)
            return found
        if self.margin > 0:
            found = self._framed(image)
        if not len(found) and self.rotated:
            found = self._turned(image)
        # The inner detector already dropped faces under its minimum size (same scale).
        return finish_detections(found, width=width, height=height, min_face_size=0)

    @staticmethod
    def _replace_close_ups(
        found: Detections, framed: Detections, width: int, height: int
    ) -> Detections:
        """Framed, a close-up's landmarks are no longer squeezed into the photo: faces the
        framed look finds replace those they overlap, the others stay."""
        if not len(framed):
            return found
        inside = np.clip(framed.boxes, 0, [width, height, width, height])
        keep = np.asarray((box_iou(found.boxes, inside) < 0.3).all(axis=1), bool)
        return finish_detections(
            found.select(keep).concat(framed), width=width, height=height, min_face_size=0
        )

    def _turned(self, image: NDArray[np.uint8]) -> Detections:
        """Upright faces found in the photo turned a quarter, in the photo's pixels.

        Turned the wrong way a face is upside down, and detectors still fire on some of those
        with the landmarks astray: of the two turns, the one whose best face scores higher wins
        (the right turn's, on every sideways photo of the dev sets)."""
        height, width = image.shape[:2]
        found, best = Detections.empty(), -np.inf
        for clockwise in (True, False):
            turned = np.ascontiguousarray(np.rot90(image, -1 if clockwise else 1))
            candidate = self.inner.detect(turned)
            candidate = candidate.select(upright(candidate.landmarks))
            if len(candidate) and candidate.scores.max() > best:
                best = float(candidate.scores.max())
                found = _turn_back(candidate, clockwise, width, height)
        return found

    def _framed(self, image: NDArray[np.uint8]) -> Detections:
        """Upright faces found in the photo framed by a black border, in the photo's pixels."""
        height, width = image.shape[:2]
        pad = int(round(self.margin * max(height, width)))
        framed = np.zeros((height + 2 * pad, width + 2 * pad, 3), np.uint8)
        framed[pad : pad + height, pad : pad + width] = image
        found = self.inner.detect(framed)
        return found.select(upright(found.landmarks)).shifted(-pad)


CLOSE_UP = 0.5
"""A face whose box reaches the photo's edge and spans this share of its shorter side is a
close-up cut off by the frame."""


def close_up(boxes: NDArray[np.float32], width: int, height: int) -> NDArray[np.bool_]:
    """Which faces fill the photo up to its edge (see `CLOSE_UP`)."""
    edge = (
        (boxes[:, 0] <= 1)
        | (boxes[:, 1] <= 1)
        | (boxes[:, 2] >= width - 1)
        | (boxes[:, 3] >= height - 1)
    )
    return edge & (face_size(boxes) >= CLOSE_UP * min(width, height))


def upright(landmarks: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Which faces stand upright in their image, within 45 degrees: from between the eyes to
    between the mouth corners points more down than sideways."""
    down = landmarks[:, 3:].mean(axis=1) - landmarks[:, :2].mean(axis=1)
    return down[:, 1] > np.abs(down[:, 0])


def _turn_back(found: Detections, clockwise: bool, width: int, height: int) -> Detections:
    """Faces found in the photo turned a quarter (clockwise or not), in the photo's pixels.

    Landmarks keep their order (left eye as seen in the turned photo first), so alignment
    still brings each face upright; boxes become the upright box around the turned one."""
    if not len(found):
        return found

    def back(points: NDArray[np.float32]) -> NDArray[np.float32]:
        x, y = points[..., 0], points[..., 1]
        if clockwise:  # turned[i, j] = photo[height - 1 - j, i]
            return np.stack([y, height - x], axis=-1).astype(np.float32)
        return np.stack([width - y, x], axis=-1).astype(np.float32)  # photo[j, width - 1 - i]

    corners = back(found.boxes.reshape(-1, 2, 2))
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    return Detections(boxes.astype(np.float32), found.scores, back(found.landmarks))


def load_detector(
    settings: PipelineSettings, *, fetch: RemoteFetcher | None = None
) -> FaceDetector:
    """The detector the settings name, with its weights resolved and verified."""
    from worker.mtcnn import MTCNNDetector, ONetVerifier

    if settings.detector == "scrfd":
        from worker.scrfd import SCRFDDetector

        scrfd: FaceDetector = SCRFDDetector.load(settings, fetch=fetch)
        if settings.verify_threshold > 0:
            scrfd = VerifiedDetector(scrfd, ONetVerifier.load(settings), settings.verify_threshold)
        return SecondLook(scrfd, margin=settings.retry_margin, rotated=settings.retry_rotated)
    # MTCNN's own last stage is ONet: verifying its faces again would add nothing.
    return SecondLook(
        MTCNNDetector.load(settings),
        margin=settings.retry_margin,
        rotated=settings.retry_rotated,
        close_ups=True,
    )


def face_size(boxes: NDArray[np.float32]) -> NDArray[np.float32]:
    """Each face's size in pixels: the longer side of its box (what `min_face_size` limits)."""
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def cover_score(scores: NDArray[np.floating], boxes: NDArray[np.floating]) -> NDArray[np.float32]:
    """How well each face shows its person, for picking a folder's cover: detector score times
    the face's linear size (the square root of its box area), so a slightly larger face does
    not beat a much clearer one. The result file and the trip write both use this."""
    width = np.maximum(boxes[:, 2] - boxes[:, 0], 1)
    height = np.maximum(boxes[:, 3] - boxes[:, 1], 1)
    return (np.asarray(scores) * np.sqrt(width * height)).astype(np.float32)


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
