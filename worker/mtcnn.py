"""MTCNN face detector: our torch port of facenet-pytorch 2.6's three-stage cascade.

The networks reuse facenet-pytorch's state dicts unchanged (its parameter names, and the
H/W transposition before the dense layers that its weight conversion from Caffe expects), and
`MTCNNDetector.detect` follows its `detect_face` step by step so that the two agree: an image
pyramid through PNet, proposals refined by RNet on 24x24 crops, then boxes, scores and the five
landmarks from ONet on 48x48 crops.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from worker.boxes import finish_detections, nms
from worker.models import InferenceModel
from worker.onet import crop_windows, square_boxes
from worker.runtime import torch_device
from worker.types import Detections

if TYPE_CHECKING:
    from worker.models import ModelFiles
    from worker.settings import PipelineSettings
    from worker.types import ModelInfo

logger = logging.getLogger(__name__)

THRESHOLDS = (0.6, 0.7, 0.7)
"""Score thresholds of PNet, RNet and ONet (facenet-pytorch's defaults)."""

PYRAMID_FACTOR = 0.709
"""Scale step between pyramid levels: about 1/sqrt(2), so each level halves the pixel count."""

PNET_CELL = 12
PNET_STRIDE = 2
RNET_CHUNK = 2048
ONET_CHUNK = 512


class PNet(nn.Module):
    """Proposal network: a fully convolutional face/not-face map with box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,3,H,W) normalised pixels -> box offsets (N,4,h,w), face probability (N,h,w)."""
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        probs = torch.softmax(self.conv4_1(x), dim=1)[:, 1]
        return self.conv4_2(x), probs


class RNet(nn.Module):
    """Refinement network: scores and box offsets for 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,3,24,24) crops -> box offsets (N,4), face probability (N,)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The dense weights were converted from Caffe, which flattens W before H.
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu4(self.dense4(x))
        probs = torch.softmax(self.dense5_1(x), dim=1)[:, 1]
        return self.dense5_2(x), probs


class ONet(nn.Module):
    """Output network: scores, box offsets and five landmarks for 48x48 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,3,48,48) crops -> box offsets (N,4), landmarks (N,10: x1..x5, y1..y5), probability."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)  # Caffe flattening order, as in RNet
        x = self.prelu5(self.dense5(x))
        probs = torch.softmax(self.dense6_1(x), dim=1)[:, 1]
        return self.dense6_2(x), self.dense6_3(x), probs


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 127.5) * 0.0078125


def pyramid_scales(
    height: int, width: int, min_face_size: int, factor: float = PYRAMID_FACTOR
) -> list[float]:
    """Scales at which PNet's 12-pixel window covers faces from `min_face_size` up to the image."""
    scale = PNET_CELL / min_face_size
    side = min(height, width) * scale
    scales: list[float] = []
    while side >= PNET_CELL:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def _apply_offsets(
    boxes: NDArray[np.float32], offsets: NDArray[np.float32], plus_one: bool
) -> NDArray[np.float32]:
    # PNet's offsets are relative to x2-x1, the later stages' to x2-x1+1 (facenet-pytorch's bbreg).
    extra = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + extra
    h = boxes[:, 3] - boxes[:, 1] + extra
    out = boxes.copy()
    out[:, 0] += offsets[:, 0] * w
    out[:, 1] += offsets[:, 1] * h
    out[:, 2] += offsets[:, 2] * w
    out[:, 3] += offsets[:, 3] * h
    return out


def _crops(image: torch.Tensor, windows: NDArray[np.int64], size: int) -> torch.Tensor:
    """(N,3,size,size) normalised crops of `image` (1,3,H,W), area-resampled as facenet does."""
    out = torch.empty(
        (len(windows), 3, size, size),
        dtype=image.dtype,
        device=image.device,
        memory_format=torch.channels_last,
    )
    # Per-box adaptive average pooling is what F.interpolate(mode="area") does; a loop of small
    # pools costs well under the networks' time even for a few thousand proposals.
    for k, (x0, y0, x1, y1) in enumerate(windows.tolist()):
        out[k] = F.adaptive_avg_pool2d(image[0, :, y0:y1, x0:x1], (size, size))
    return _normalise(out)


def _run_on_crops(
    net: nn.Module, image: torch.Tensor, windows: NDArray[np.int64], size: int, chunk: int
) -> list[NDArray[np.float32]]:
    """`net`'s outputs (as numpy) on the crops of `windows`, `chunk` crops per forward.

    Chunks bound memory: a busy photo gives thousands of proposals, and RNet's first
    activation alone takes 54 KB per crop (ONet's 270 KB).
    """
    parts = [
        net(_crops(image, windows[i : i + chunk], size)) for i in range(0, len(windows), chunk)
    ]
    return [torch.cat([p[k] for p in parts]).cpu().numpy() for k in range(len(parts[0]))]


class MTCNNDetector(InferenceModel[[NDArray[np.uint8]], Detections]):
    """Finds faces with MTCNN on torch; `detect` takes RGB (H, W, 3) uint8 pixels."""

    name = "mtcnn"

    def __init__(
        self,
        pnet: PNet,
        rnet: RNet,
        onet: ONet,
        *,
        device: str,
        models: list[ModelInfo],
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = THRESHOLDS,
        factor: float = PYRAMID_FACTOR,
    ) -> None:
        self.pnet, self.rnet, self.onet = pnet, rnet, onet
        self.device = device
        self.models = models
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.factor = factor

    @classmethod
    def _load(cls, settings: PipelineSettings, files: ModelFiles) -> MTCNNDetector:
        """The three networks with their packaged weights checked and loaded onto the device."""
        device = torch_device(settings)
        infos = [files.resolve(name) for name in ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")]
        pnet, rnet, onet = PNet(), RNet(), ONet()
        for net, info in zip((pnet, rnet, onet), infos, strict=True):
            net.load_state_dict(torch.load(info.path, map_location=device, weights_only=True))
            # Channels-last halves the CPU time of these small convolutions, PReLUs and pools.
            net.to(device).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
        thresholds = THRESHOLDS
        if settings.detection_threshold is not None:
            thresholds = (THRESHOLDS[0], THRESHOLDS[1], settings.detection_threshold)
        return cls(
            pnet,
            rnet,
            onet,
            device=device,
            models=infos,
            min_face_size=settings.min_face_size,
            thresholds=thresholds,
        )

    def detect(self, image: NDArray[np.uint8]) -> Detections:
        """Faces in an RGB (H, W, 3) uint8 image, best score first, in its pixel coordinates."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
        height, width = image.shape[:2]
        with torch.inference_mode():
            pixels = torch.as_tensor(np.array(image, copy=True), device=self.device)
            # (1, 3, H, W) whose memory stays (H, W, 3): channels-last, as the networks want it.
            pixels = pixels.permute(2, 0, 1).unsqueeze(0).float()
            boxes = self._propose(pixels)
            if len(boxes):
                boxes = self._refine(pixels, boxes)
            if len(boxes) == 0:
                return Detections.empty()
            found = self._output(pixels, boxes)
        return finish_detections(
            found, width=width, height=height, min_face_size=self.min_face_size
        )

    predict = detect

    def _propose(self, pixels: torch.Tensor) -> NDArray[np.float32]:
        """Stage 1: PNet over the pyramid -> square candidate boxes (n, 5: box, score)."""
        height, width = pixels.shape[2:]
        per_scale: list[NDArray[np.float32]] = []
        for scale in pyramid_scales(height, width, self.min_face_size, self.factor):
            size = (int(height * scale + 1), int(width * scale + 1))
            offsets, probs = self.pnet(_normalise(F.interpolate(pixels, size=size, mode="area")))
            ys, xs = torch.nonzero(probs[0] >= self.thresholds[0], as_tuple=True)
            if ys.numel() == 0:
                continue
            score = probs[0, ys, xs].cpu().numpy()
            reg = offsets[0, :, ys, xs].T.cpu().numpy()
            cells = torch.stack([xs, ys], dim=1).float().cpu().numpy()
            # Each PNet output cell sees a 12x12 window at stride 2 of the scaled image.
            top_left = np.floor((PNET_STRIDE * cells + 1) / scale)
            bottom_right = np.floor((PNET_STRIDE * cells + PNET_CELL) / scale)
            found = np.concatenate([top_left, bottom_right, score[:, None], reg], axis=1).astype(
                np.float32
            )
            per_scale.append(found[nms(found[:, :4], found[:, 4], 0.5)])
        if not per_scale:
            return np.zeros((0, 5), np.float32)
        found = np.concatenate(per_scale)
        found = found[nms(found[:, :4], found[:, 4], 0.7)]
        boxes = _apply_offsets(found[:, :4], found[:, 5:9], plus_one=False)
        return square_boxes(np.concatenate([boxes, found[:, 4:5]], axis=1))

    def _refine(self, pixels: torch.Tensor, boxes: NDArray[np.float32]) -> NDArray[np.float32]:
        """Stage 2: RNet on 24x24 crops -> fewer, better square boxes (n, 5)."""
        height, width = pixels.shape[2:]
        windows, ok = crop_windows(boxes, width, height)
        boxes, windows = boxes[ok], windows[ok]
        if len(boxes) == 0:
            return boxes
        offsets, score = _run_on_crops(self.rnet, pixels, windows, 24, RNET_CHUNK)
        keep = score > self.thresholds[1]
        boxes = np.concatenate([boxes[keep, :4], score[keep, None]], axis=1)
        reg = offsets[keep]
        pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes, reg = boxes[pick], reg[pick]
        boxes[:, :4] = _apply_offsets(boxes[:, :4], reg, plus_one=True)
        return square_boxes(boxes)

    def _output(self, pixels: torch.Tensor, boxes: NDArray[np.float32]) -> Detections:
        """Stage 3: ONet on 48x48 crops -> final boxes, scores and landmarks."""
        height, width = pixels.shape[2:]
        windows, ok = crop_windows(boxes, width, height)
        boxes, windows = boxes[ok], windows[ok]
        if len(boxes) == 0:
            return Detections.empty()
        offsets, points, score = _run_on_crops(self.onet, pixels, windows, 48, ONET_CHUNK)
        keep = score > self.thresholds[2]
        boxes, score = boxes[keep, :4], score[keep]
        reg, points_np = offsets[keep], points[keep]
        # ONet gives the five x's, then the five y's, relative to the (square) crop box.
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        landmarks = np.stack(
            [w * points_np[:, :5] + boxes[:, 0:1] - 1, h * points_np[:, 5:] + boxes[:, 1:2] - 1],
            axis=2,
        )
        boxes = _apply_offsets(boxes, reg, plus_one=True)
        # "Min" overlap drops a box lying inside a better one (a face part found as a face).
        pick = nms(boxes, score, 0.7, mode="min")
        return Detections(
            boxes=boxes[pick].astype(np.float32),
            scores=score[pick].astype(np.float32),
            landmarks=landmarks[pick].astype(np.float32),
        )
