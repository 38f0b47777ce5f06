"""SCRFD face detector on ONNX Runtime, ported from InsightFace's `model_zoo/scrfd.py`.

The image is scaled to fit a square input (aspect kept, padded at the bottom and right),
the network predicts per anchor point a score, distances to the four box sides and offsets of
the five landmarks; we decode those for each stride, keep scores above the threshold, run NMS
and map everything back to the input image's pixels.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.boxes import finish_detections, nms
from worker.errors import ModelError
from worker.models import InferenceModel
from worker.runtime import ScratchArrays, onnx_session
from worker.types import Detections

if TYPE_CHECKING:
    from worker.models import ModelFiles
    from worker.settings import PipelineSettings
    from worker.types import ModelInfo

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
NMS_IOU = 0.4


class DetectorSession(Protocol):
    """The part of `onnxruntime.InferenceSession` SCRFD uses (tests pass a fake one)."""

    def get_inputs(self) -> Sequence[Any]:
        """Input descriptions with `.name`."""
        ...

    def get_outputs(self) -> Sequence[Any]:
        """Output descriptions with `.name`."""
        ...

    def run(self, output_names: list[str], input_feed: dict[str, Any]) -> list[Any]:
        """The named outputs for one input feed."""
        ...


@dataclass(frozen=True)
class HeadLayout:
    """Which outputs hold each stride's scores, box distances and landmark offsets."""

    strides: tuple[int, ...]
    anchors_per_point: int
    score_names: tuple[str, ...]
    bbox_names: tuple[str, ...]
    kps_names: tuple[str, ...]


def head_layout(output_names: Sequence[str]) -> HeadLayout:
    """The head layout of an SCRFD export, from its output names (or their order).

    Exports from InsightFace name outputs `score_8`, `bbox_16`, `kps_32`...; others keep
    InsightFace's order: all scores, then all boxes, then all landmarks, by stride.
    """
    names = list(output_names)
    strides: tuple[int, ...]
    if len(names) == 9:
        strides, anchors = (8, 16, 32), 2
    elif len(names) == 15:
        strides, anchors = (8, 16, 32, 64, 128), 1
    else:
        raise ModelError(
            f"SCRFD model has {len(names)} outputs ({', '.join(names)}); expected 9 or 15, "
            "i.e. a model with the five landmarks (a *_bnkps or *_kps export)"
        )
    by_name = {}
    for name in names:
        match = re.fullmatch(r"(score|bbox|kps)_(\d+)", name)
        if match:
            by_name[(match[1], int(match[2]))] = name
    if len(by_name) == len(names):
        try:
            return HeadLayout(
                strides,
                anchors,
                tuple(by_name[("score", s)] for s in strides),
                tuple(by_name[("bbox", s)] for s in strides),
                tuple(by_name[("kps", s)] for s in strides),
            )
        except KeyError as exc:
            raise ModelError(f"SCRFD model outputs {names} miss {exc.args[0]}") from exc
    n = len(strides)
    return HeadLayout(
        strides, anchors, tuple(names[:n]), tuple(names[n : 2 * n]), tuple(names[2 * n :])
    )


@functools.lru_cache(maxsize=256)
def anchor_centres(height: int, width: int, stride: int, anchors: int) -> NDArray[np.float32]:
    """(height*width*anchors, 2) x, y of each anchor, row by row, anchors of a point together.

    Cached per input shape (read-only): photos of one album come in a few shapes."""
    ys, xs = np.mgrid[:height, :width]
    centres = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    centres = np.repeat(centres, anchors, axis=0)
    centres.flags.writeable = False
    return centres


def distance2bbox(
    points: NDArray[np.float32], distance: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Boxes x1, y1, x2, y2 from anchor points and distances to the left, top, right, bottom."""
    return np.concatenate([points - distance[:, :2], points + distance[:, 2:4]], axis=1)


def distance2kps(points: NDArray[np.float32], distance: NDArray[np.float32]) -> NDArray[np.float32]:
    """Landmarks (n, k, 2) from anchor points and (n, 2k) x, y offsets."""
    return points[:, None, :] + distance.reshape(distance.shape[0], distance.shape[1] // 2, 2)


def decode_head(
    outputs: dict[str, NDArray[np.float32]],
    layout: HeadLayout,
    input_height: int,
    input_width: int,
    threshold: float,
) -> Detections:
    """Faces scoring at least `threshold` from SCRFD's raw outputs, in input pixels, before NMS."""
    boxes, scores, points = [], [], []
    for stride, score_name, bbox_name, kps_name in zip(
        layout.strides, layout.score_names, layout.bbox_names, layout.kps_names, strict=True
    ):
        score = np.asarray(outputs[score_name], np.float32).reshape(-1)
        bbox = np.asarray(outputs[bbox_name], np.float32).reshape(-1, 4)
        kps = np.asarray(outputs[kps_name], np.float32).reshape(-1, 10)
        centres = anchor_centres(
            input_height // stride, input_width // stride, stride, layout.anchors_per_point
        )
        if not (len(score) == len(bbox) == len(kps) == len(centres)):
            raise ModelError(
                f"SCRFD output for stride {stride} has {len(score)} anchors, expected "
                f"{len(centres)} for a {input_width}x{input_height} input"
            )
        keep = score >= threshold
        # Distances are predicted in units of the stride.
        boxes.append(distance2bbox(centres[keep], bbox[keep] * stride))
        points.append(distance2kps(centres[keep], kps[keep] * stride))
        scores.append(score[keep])
    return Detections(
        boxes=np.concatenate(boxes).astype(np.float32),
        scores=np.concatenate(scores).astype(np.float32),
        landmarks=np.concatenate(points).astype(np.float32),
    )


INPUT_MEAN = 127.5
INPUT_STD = 128.0
"""SCRFD's input scaling, (x - 127.5) / 128, as InsightFace feeds it."""


def letterbox_size(height: int, width: int, size: int) -> tuple[int, int, float]:
    """(new height, new width, scale) of an image fitted into a size x size square.

    Never enlarged: a close-up portrait blown up to the input size has a face bigger than
    SCRFD's largest anchors and is missed (17 of 200 CelebA photos at 800 px, none at 1x)."""
    scale = min(size / height, size / width, 1.0)
    new_w = max(1, min(size, int(round(width * scale))))
    new_h = max(1, min(size, int(round(height * scale))))
    return new_h, new_w, scale


def letterbox(
    image: NDArray[np.uint8], size: int, scratch: ScratchArrays | None = None
) -> tuple[NDArray[np.float32], float]:
    """SCRFD's input for `image`: shrunk to fit a size x size square (aspect kept),
    zero-padded bottom/right, scaled as the network expects, NCHW float32 (1, 3, h, w).

    The padding stops at the next multiple of 32 (the network's largest stride) rather than
    filling the square: the model takes any such shape, finds the same faces (measured on
    voc-faces, scenery and the 44 g20 photos) and a 3:2 photo costs a third less. The input
    is written into `scratch`'s arrays when given (valid until the next call from this
    thread). Returns the input and the scale from image pixels to its pixels.
    """
    scratch = scratch or ScratchArrays()
    height, width = image.shape[:2]
    new_h, new_w, scale = letterbox_size(height, width, size)
    resized: NDArray[Any] = image
    if (new_h, new_w) != (height, width):
        # INTER_AREA: a big photo squeezed into 640 px aliases badly otherwise.
        resized = cv2.resize(
            image,
            (new_w, new_h),
            dst=scratch.get("resized", (new_h, new_w, 3), np.uint8),
            interpolation=cv2.INTER_AREA,
        )
    # Scaled in the pixels' own (contiguous) order, then moved to NCHW: a third of the time
    # of scaling through a transposed view.
    scaled = scratch.get("scaled", (new_h, new_w, 3), np.float32)
    np.subtract(resized, np.float32(INPUT_MEAN), out=scaled, dtype=np.float32)
    np.divide(scaled, np.float32(INPUT_STD), out=scaled)
    blob = scratch.get("blob", (1, 3, -(-new_h // 32) * 32, -(-new_w // 32) * 32), np.float32)
    blob[0, :, :new_h, :new_w] = scaled.transpose(2, 0, 1)
    padding = np.float32(-INPUT_MEAN / INPUT_STD)  # a zero pixel
    blob[0, :, new_h:, :] = padding
    blob[0, :, :new_h, new_w:] = padding
    return blob, scale


class SCRFDDetector(InferenceModel[[NDArray[np.uint8]], Detections]):
    """Finds faces with SCRFD (ONNX Runtime); `detect` takes RGB (H, W, 3) uint8 pixels."""

    name = "scrfd"

    def __init__(
        self,
        session: DetectorSession,
        *,
        models: list[ModelInfo],
        input_size: int = 640,
        threshold: float = DEFAULT_THRESHOLD,
        nms_iou: float = NMS_IOU,
        min_face_size: int = 20,
    ) -> None:
        if input_size % 32:
            raise ValueError(f"SCRFD input size must be a multiple of 32, got {input_size}")
        self.session = session
        self.models = models
        self.input_size = input_size
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.min_face_size = min_face_size
        self._input_name = session.get_inputs()[0].name
        self._layout = head_layout([o.name for o in session.get_outputs()])
        self._scratch = ScratchArrays()
        self._output_names = [
            *self._layout.score_names,
            *self._layout.bbox_names,
            *self._layout.kps_names,
        ]

    @classmethod
    def _load(cls, settings: PipelineSettings, files: ModelFiles) -> SCRFDDetector:
        """SCRFD with its weights resolved (packaged, a local path or a remote URI) and checked."""
        info = files.resolve(
            "scrfd_500m_bnkps", override=settings.scrfd_path, override_sha256=settings.scrfd_sha256
        )
        threshold = settings.detection_threshold
        return cls(
            onnx_session(info.path, settings),
            models=[info],
            input_size=settings.scrfd_input_size,
            threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
            min_face_size=settings.min_face_size,
        )

    def detect(self, image: NDArray[np.uint8]) -> Detections:
        """Faces in an RGB (H, W, 3) uint8 image, best score first, in its pixel coordinates."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
        height, width = image.shape[:2]
        blob, scale = letterbox(np.ascontiguousarray(image), self.input_size, self._scratch)
        outputs = self.session.run(self._output_names, {self._input_name: blob})
        found = decode_head(
            dict(zip(self._output_names, outputs, strict=True)),
            self._layout,
            blob.shape[2],
            blob.shape[3],
            self.threshold,
        )
        found = found.select(nms(found.boxes, found.scores, self.nms_iou)).scaled(1.0 / scale)
        return finish_detections(
            found, width=width, height=height, min_face_size=self.min_face_size
        )

    predict = detect
