"""A closer look at big photos: faces a few metres away in 12-MP group shots.

The coarse pass (SCRFD fitted into `AFTERTRIP_SCRFD_INPUT_SIZE`, 800 px) sees a 4000x3000
phone photo at a fifth of its size: a face 28-48 px wide in the photo is 6-10 px there, under
SCRFD's smallest anchors, and `AFTERTRIP_MIN_FACE_SIZE` (20 working pixels, 40 of the photo's)
dropped what was left. A friend 10 m away is such a face.

`CloserLook` runs the coarse pass as before and then, on photos too big for it to see a face of
`AFTERTRIP_CLOSER_LOOK_MIN_FACE` photo pixels at `INPUT_FACE` pixels, a second SCRFD pass at the
scale that does (about 0.42 of a 12-MP photo: a 1664-px input) with a lower score threshold
(`PROPOSAL`). Each of its faces that overlaps no coarse face is looked at again zoomed, in a
window around it (all windows in one SCRFD input), must score the detector's threshold there
and convince ONet like the coarse pass's faces; it is added with the zoomed look's box and
landmarks. Portraits and selfies
(the coarse pass found a face of `PORTRAIT` of the photo's shorter side or more) and photos the
coarse pass already sees at that scale are not looked at again, so they cost what they did.
Measured with `aftertrip-faces bench groupshots` (docs/pipeline.md, bench/RESULTS.md).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.boxes import box_iou, face_size, finish_detections, nms
from worker.detect import FaceDetector, FaceVerifier, SecondLook
from worker.scrfd import NMS_IOU, SCRFDDetector, letterbox_size
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

PROPOSAL = 0.25
"""The closer look's pass keeps SCRFD's faces from this score on, as proposals: each is
looked at again zoomed (`ZOOM_FACE`) and kept if it scores the detector's own threshold there."""

ZOOM_FACE = 32
"""A proposal is looked at again with its face this wide in SCRFD's input (about 2x in a
12-MP photo's working pixels): a 48-px face in an idol photo shrunk onto a landscape scored
0.51 at the closer look's scale and 0.80 zoomed, and the zoomed look's landmarks align the
small face better (tuning set at 28 px: 0.90 of the found faces in their person's folder
against 0.84 with the landmarks of the closer look's pass)."""

ZOOM_CONTEXT = 2.5
"""The zoomed window is this many face widths wide, centred on the proposal."""

ZOOM_GAP = 16
"""Black pixels between zoomed windows, which are laid out side by side in one input."""

TILE = 640
"""Side of the closer look's tiles, in its input's pixels (a multiple of SCRFD's stride 32)."""

TILE_OVERLAP = 48
"""Pixels neighbouring tiles share: a face up to this wide in the closer look's input (115 px
of a 12-MP photo) cut by one tile is whole in the next. Bigger faces are the coarse pass's:
it sees a 115-px face at 23 px of its 800-px input. 96 looked at 2.78 Mpx of a 12-MP photo's
tiles, 48 at 2.47 (tuning split: found 0.993 / 0.98 / 0.963 at 48 / 36 / 28 px with 96 and
the view resized by area, 0.991 / 0.98 / 0.96 with 48 and bilinear, for 8 % less CPU at 48 px)."""

LINEAR_FROM = 0.5
"""The closer look's view is resized bilinearly when it keeps at least this share of the
working pixels' side (each output pixel then blends the 2x2 inputs around it), by area
below (bilinear would skip pixels and alias)."""

MAX_INPUT = 8192
"""SCRFD's input cap for the closer look: the image is resized to the wanted scale first,
and SCRFD never enlarges, so this only has to exceed any working image's side."""


class CloserLook:
    """The coarse detector's faces plus those a second, finer SCRFD pass finds in big photos.

    `coarse` is the usual detector (with its second looks); `fine` an SCRFD whose input is
    never the limit (`MAX_INPUT`) and that keeps faces of any size; `verifier` (ONet) must
    give a fine face at least `threshold`. `min_face` is in the photo's own pixels.
    `tile_overlap` and `linear_view` (see `TILE_OVERLAP`, `LINEAR_FROM`) may be set on an
    instance, to compare layouts in one process (bench/groupshots.py's tuning).
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
        score_threshold: float,
    ) -> None:
        self.coarse = coarse
        self.fine = fine
        self.verifier = verifier
        self.threshold = threshold
        self.min_face = min_face
        self.coarse_input = coarse_input
        self.score_threshold = score_threshold
        self.tile_overlap = TILE_OVERLAP
        self.linear_view = True
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
        view = image
        if factor < 1.0:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            # Bilinear from half the size up: INTER_AREA took 16 ms of a 12-MP photo's
            # 2000x1500 working pixels to 1667x1250 (bilinear 3), for the same faces.
            linear = factor >= LINEAR_FROM and self.linear_view
            method = cv2.INTER_LINEAR if linear else cv2.INTER_AREA
            view = np.asarray(cv2.resize(image, size, interpolation=method), np.uint8)
        fine = self._tiled(view).scaled(1.0 / factor)
        fine = fine.select(face_size(fine.boxes) >= smallest)
        if len(found) and len(fine):
            fine = fine.select(box_iou(fine.boxes, found.boxes).max(axis=1) < NEW_FACE_IOU)
        if len(fine):
            fine = self._zoom(image, fine)
        if len(fine) and self.verifier is not None:
            fine = fine.select(self.verifier.face_probability(image, fine.boxes) >= self.threshold)
        if not len(fine):
            return found
        logger.debug("closer look at %.2f: %d more faces", factor, len(fine))
        return finish_detections(found.concat(fine), width=width, height=height, min_face_size=0)

    def _tiled(self, view: NDArray[np.uint8]) -> Detections:
        """SCRFD's faces in `view`, looked at in overlapping tiles of at most `TILE` px: one
        1664x1248 input held ONNX Runtime's activations for 165 MiB more peak RSS than the
        coarse pass; tiles hold a 640x640 input's. A face cut by a tile's edge is whole in its
        neighbour (faces up to `tile_overlap` px there: bigger ones are the coarse pass's)."""
        found = Detections.empty()
        for top, bottom in tile_spans(view.shape[0], self.tile_overlap):
            for left, right in tile_spans(view.shape[1], self.tile_overlap):
                tile = np.ascontiguousarray(view[top:bottom, left:right])
                seen = self.fine.detect(tile)
                if len(seen):
                    shift = np.array([left, top], np.float32)
                    found = found.concat(
                        Detections(
                            (seen.boxes.reshape(-1, 2, 2) + shift).reshape(-1, 4),
                            seen.scores,
                            seen.landmarks + shift,
                        )
                    )
        return found.select(nms(found.boxes, found.scores, NMS_IOU))

    def _zoom(self, image: NDArray[np.uint8], proposals: Detections) -> Detections:
        """Each proposal looked at again in a window around it, zoomed so that its face is
        `ZOOM_FACE` px wide; the windows side by side in one SCRFD input. A proposal is kept
        as the zoomed look's best face on it scoring at least the detector's threshold."""
        window = int(round(ZOOM_FACE * ZOOM_CONTEXT))
        cell = window + ZOOM_GAP
        per_row = max(1, int(np.ceil(np.sqrt(len(proposals)))))
        rows = -(-len(proposals) // per_row)
        mosaic = np.zeros((rows * cell, per_row * cell, 3), np.uint8)
        centres = (proposals.boxes[:, :2] + proposals.boxes[:, 2:]) / 2
        zooms = ZOOM_FACE / np.maximum(face_size(proposals.boxes), 1.0)
        origins = []
        for i, ((cx, cy), zoom) in enumerate(zip(centres, zooms, strict=True)):
            left, top = (i % per_row) * cell, (i // per_row) * cell
            # photo point p lands at (p - centre) * zoom + window / 2 in the window
            shift = window / 2 - np.array([cx, cy]) * zoom
            matrix = np.array([[zoom, 0, shift[0]], [0, zoom, shift[1]]], np.float32)
            mosaic[top : top + window, left : left + window] = cv2.warpAffine(
                image, matrix, (window, window), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0)
            )
            origins.append((left + shift[0], top + shift[1]))
        seen = self.fine.detect(mosaic)
        seen = seen.select(seen.scores >= self.score_threshold)
        kept = []
        for i, (origin, zoom) in enumerate(zip(origins, zooms, strict=True)):
            back = Detections(
                ((seen.boxes.reshape(-1, 2, 2) - origin) / zoom).reshape(-1, 4),
                seen.scores,
                (seen.landmarks - np.asarray(origin, np.float32)) / zoom,
            )
            if not len(back):
                continue
            overlap = box_iou(proposals.boxes[i : i + 1], back.boxes)[0]
            if overlap.max() >= NEW_FACE_IOU:
                kept.append(back.select(np.array([int(np.argmax(overlap))])))
        found = Detections.empty()
        for face in kept:
            found = found.concat(face)
        return Detections(
            found.boxes.astype(np.float32),
            found.scores.astype(np.float32),
            found.landmarks.astype(np.float32),
        )


def tile_spans(length: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of `TILE`-px tiles covering `length` px, neighbours sharing `overlap` px;
    the last one is what is left (SCRFD pads it to its stride, 32, not to a whole tile)."""
    step = TILE - overlap
    return [
        (start, min(start + TILE, length)) for start in range(0, max(1, length - overlap), step)
    ]


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
        threshold=min(PROPOSAL, detector.threshold),
        nms_iou=detector.nms_iou,
        min_face_size=0,
    )
