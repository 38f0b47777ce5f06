"""A closer look at big photos: faces a few metres away in 12-MP group shots.

The coarse pass (SCRFD fitted into `AFTERTRIP_SCRFD_INPUT_SIZE`, 800 px) sees a 4000x3000
phone photo at a fifth of its size: a face 28-48 px wide in the photo is 6-10 px there, under
SCRFD's smallest anchors, and `AFTERTRIP_MIN_FACE_SIZE` (20 working pixels, 40 of the photo's)
dropped what was left. A friend 10 m away is such a face.

`CloserLook` runs the coarse pass as before and then, on photos too big for it to see a face of
`AFTERTRIP_CLOSER_LOOK_MIN_FACE` photo pixels at `INPUT_FACE` pixels, a second SCRFD pass at the
scale that does (about 0.42 of a 12-MP photo: a 1664-px input), whose faces must convince ONet
like the coarse pass's. Its faces that overlap no coarse face are added. Portraits and selfies
(the coarse pass found a face of `PORTRAIT` of the photo's shorter side or more) and photos the
coarse pass already sees at that scale are not looked at again, so they cost what they did.
Measured with `aftertrip-faces bench groupshots` (docs/pipeline.md, bench/RESULTS.md).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.boxes import box_iou, face_size, finish_detections
from worker.detect import FaceDetector, FaceVerifier, SecondLook
from worker.scrfd import SCRFDDetector, letterbox_size
from worker.types import DecodedImage, Detections

logger = logging.getLogger(__name__)

INPUT_FACE = 10.0
"""Width in SCRFD's input at which the closer look wants the smallest face: SCRFD-500M's
smallest anchors are 16 px at stride 8, and on the tuning photos (g20 shrunk to 12 MP) faces
at 10-11 px were found 0.88-0.95 of the time, against 0.05 at 6 px."""

PORTRAIT = 0.15
"""A coarse face this share of the photo's shorter side or more makes the photo a portrait or
a selfie: no closer look (its background people are strangers, and it stays as fast)."""

NEW_FACE_IOU = 0.3
"""A closer-look face overlapping a coarse face this much is that face (the coarse one stays)."""

MAX_INPUT = 8192
"""SCRFD's input cap for the closer look: the image is resized to the wanted scale first,
and SCRFD never enlarges, so this only has to exceed any working image's side."""


class CloserLook:
    """The coarse detector's faces plus those a second, finer SCRFD pass finds in big photos.

    `coarse` is the usual detector (with its second looks); `fine` an SCRFD whose input is
    never the limit (`MAX_INPUT`) and that keeps faces of any size; `verifier` (ONet) must
    give a fine face at least `threshold`. `min_face` is in the photo's own pixels.
    """

    def __init__(
        self,
        coarse: SecondLook,
        fine: SCRFDDetector,
        verifier: FaceVerifier | None,
        *,
        threshold: float,
        min_face: int,
        coarse_input: int,
    ) -> None:
        self.coarse = coarse
        self.fine = fine
        self.verifier = verifier
        self.threshold = threshold
        self.min_face = min_face
        self.coarse_input = coarse_input
        self.name = coarse.name
        self.models = coarse.models

    def detect(self, image: NDArray[np.uint8]) -> Detections:
        """Faces in `image`, taken as the photo at its own size (see `detect_photo`)."""
        return self.detect_photo(image, 1.0)

    def fine_scale(self, height: int, width: int, scale: float) -> float | None:
        """The factor from working pixels to the closer look's input for a working image of
        `height` x `width` (`scale` = working / photo pixels), or None when the coarse pass
        already sees a `min_face` face at `INPUT_FACE` pixels."""
        if self.min_face <= 0:
            return None
        wanted = INPUT_FACE / (self.min_face * scale)
        coarse = letterbox_size(height, width, self.coarse_input)[2]
        if coarse >= 0.95 * wanted:
            return None
        # Working pixels are as fine as it gets: a photo decoded smaller than the scale wanted
        # (over about 24 Mpx) is looked at in them, and its smallest faces stay unfound.
        return min(wanted, 1.0)

    def detect_photo(self, image: NDArray[np.uint8], scale: float) -> Detections:
        """Faces in a photo's working pixels `image` (`scale` = working / photo pixels),
        best first, in those pixels."""
        height, width = image.shape[:2]
        found = self.coarse.inner.detect(image)
        factor = self.fine_scale(height, width, scale)
        portrait = len(found) and face_size(found.boxes).max() >= PORTRAIT * min(height, width)
        if factor is not None and not portrait:
            found = self._add_fine(image, found, factor, self.min_face * scale)
        if len(found):
            return found
        return self.coarse.look_again(image)

    def _add_fine(
        self, image: NDArray[np.uint8], found: Detections, factor: float, smallest: float
    ) -> Detections:
        height, width = image.shape[:2]
        view: NDArray[np.uint8] = image
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            view = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        fine = self.fine.detect(view).scaled(1.0 / factor)
        fine = fine.select(face_size(fine.boxes) >= smallest)
        if len(found) and len(fine):
            fine = fine.select(box_iou(fine.boxes, found.boxes).max(axis=1) < NEW_FACE_IOU)
        if len(fine) and self.verifier is not None:
            fine = fine.select(self.verifier.face_probability(image, fine.boxes) >= self.threshold)
        if not len(fine):
            return found
        logger.debug("closer look at %.2f: %d more faces", factor, len(fine))
        return finish_detections(found.concat(fine), width=width, height=height, min_face_size=0)


def detect_photo(detector: FaceDetector, image: DecodedImage) -> Detections:
    """`detector`'s faces in a decoded photo's working pixels; a `CloserLook` is told the
    photo's scale, so that its smallest face is counted in the photo's own pixels."""
    if isinstance(detector, CloserLook):
        return detector.detect_photo(image.pixels, image.scale)
    return detector.detect(image.pixels)


def fine_detector(detector: SCRFDDetector) -> SCRFDDetector:
    """An SCRFD sharing `detector`'s session, for the closer look: its input never limits the
    image (which is resized before) and it keeps faces of any size (filtered after)."""
    return SCRFDDetector(
        detector.session,
        models=detector.models,
        input_size=MAX_INPUT,
        threshold=detector.threshold,
        nms_iou=detector.nms_iou,
        min_face_size=0,
    )
