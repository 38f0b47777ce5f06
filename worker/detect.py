"""Face detection: one small interface, and detectors that compose (a verifier's second
opinion, second looks); `worker.zoo` builds them from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.typing import NDArray

from worker.boxes import box_iou, close_up, finish_detections, upright
from worker.types import Detections

__all__ = ["FaceDetector", "FaceVerifier", "SecondLook", "VerifiedDetector"]

if TYPE_CHECKING:
    from worker.types import ModelInfo


class FaceDetector(Protocol):
    """Finds faces in an RGB image (H, W, 3 uint8) and returns them in its pixels."""

    name: str
    models: list[ModelInfo]

    def detect(self, image: NDArray[np.uint8]) -> Detections:
        """Faces in `image`, best score first."""
        ...


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
        return self.look_again(image)

    def look_again(self, image: NDArray[np.uint8]) -> Detections:
        """The second looks alone, for a photo in which no face was found: framed, then
        turned; in the photo's pixels."""
        height, width = image.shape[:2]
        found = Detections.empty()
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
