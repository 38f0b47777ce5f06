"""Box geometry shared by the detectors and their callers: IoU, NMS, sizes, cover scores.

This module sits below `worker.detect`, `worker.mtcnn` and `worker.scrfd` (they import it,
it imports none of them), so the imports run one way.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from worker.types import Detections


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
