"""ONet on ONNX Runtime, built from facenet-pytorch's weights without torch, against the torch
port (`worker.mtcnn.ONet`) on real face crops; and the default pipeline never imports torch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image

from tests.support.files import ROOT, vectron_image_path
from worker.errors import ModelChecksumMismatch, ModelError
from worker.models import resolve_model
from worker.mtcnn import ONET_CHUNK, ONet, _run_on_crops
from worker.onet import (
    ONET_ONNX_SHA256,
    ONetSession,
    ONetVerifier,
    area_crop,
    crop_windows,
    normalised_crops,
    onet_graph,
    onet_onnx,
    read_state_dict,
    square_boxes,
)
from worker.runtime import onnx_session
from worker.scrfd import SCRFDDetector
from worker.settings import PipelineSettings


def rgb(data: bytes) -> NDArray[np.uint8]:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> PipelineSettings:
    return PipelineSettings(device="cpu", model_cache_dir=tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize("name", ["mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"])
def test_state_dicts_read_without_torch_equal_torch_load(name: str) -> None:
    path = resolve_model(name).path
    ours = read_state_dict(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == np.float32
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


def test_onet_graph_is_reproducible_and_pinned() -> None:
    weights = read_state_dict(resolve_model("mtcnn_onet").path)
    first, second = onet_graph(weights), onet_graph(weights)
    assert first == second
    assert hashlib.sha256(first).hexdigest() == ONET_ONNX_SHA256


def test_onet_onnx_is_cached_and_checked(settings: PipelineSettings) -> None:
    info = resolve_model("mtcnn_onet")
    built = onet_onnx(settings, info)
    cached = list(Path(settings.model_cache_dir).glob("mtcnn_onet.*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == built
    # A damaged cache is rebuilt, not trusted.
    cached[0].write_bytes(b"damaged")
    assert onet_onnx(settings, info) == built
    assert cached[0].read_bytes() == built


def test_weights_that_build_another_graph_are_refused(
    settings: PipelineSettings, tmp_path: Path
) -> None:
    """Other weights than the pinned ones give another sha256: a clear error, not a model."""
    info = resolve_model("mtcnn_onet")
    other = settings.model_copy(update={"model_cache_dir": tmp_path})
    original = Path(info.path).read_bytes()
    # Flip one bit of the last weight; the file stays a valid legacy torch.save file.
    changed = tmp_path / "onet.pt"
    changed.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ModelChecksumMismatch, match="facenet-pytorch==2.6.0"):
        onet_onnx(other, info.__class__(info.name, info.role, str(changed), info.sha256))


def test_unexpected_objects_in_a_weight_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, fh, protocol=2)
        pickle.dump(os.system, fh, protocol=2)  # a global the reader must not resolve
    with pytest.raises(ModelError, match="unexpected object posix.system"):
        read_state_dict(path)
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelError):
        read_state_dict(tmp_path / "zip.pt")


@pytest.fixture(scope="module")
def face_windows(settings: PipelineSettings) -> list[tuple[NDArray[np.uint8], NDArray[np.int64]]]:
    """The crop windows ONet sees for SCRFD's faces on the three shipped photos, plus windows
    cut by the photo's edge and a few that hold no face."""
    detector = SCRFDDetector.load(settings)
    out = []
    for name in ("gdp.jpg", "players.jpg", "yaoming.jpg"):
        image = rgb(vectron_image_path(name).read_bytes())
        height, width = image.shape[:2]
        boxes = detector.detect(image).boxes
        extra = np.array(
            [[-30, -20, 60, 80], [width - 50, height - 70, width + 40, height + 10]], np.float32
        )
        boxes = np.concatenate([boxes, extra, boxes[:3] + 37.5])
        windows, valid = crop_windows(square_boxes(boxes), width, height)
        out.append((image, windows[valid]))
    assert sum(len(w) for _, w in out) > 30
    return out


def test_ort_onet_equals_the_torch_port_on_real_face_crops(
    settings: PipelineSettings, face_windows: list[tuple[NDArray[np.uint8], NDArray[np.int64]]]
) -> None:
    torch_onet = ONet()
    torch_onet.load_state_dict(torch.load(resolve_model("mtcnn_onet").path, weights_only=True))
    torch_onet.to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    ort_onet = ONetSession(onnx_session(onet_onnx(settings, resolve_model("mtcnn_onet")), settings))
    probabilities = []
    for image, windows in face_windows:
        with torch.inference_mode():
            pixels = torch.as_tensor(image.copy()).permute(2, 0, 1).unsqueeze(0).float()
            expected = _run_on_crops(torch_onet, pixels, windows, 48, ONET_CHUNK)
        crops = normalised_crops(image, windows, 48)
        offsets, landmarks, probability = ort_onet.run(crops)
        np.testing.assert_allclose(offsets, expected[0], atol=2e-4)
        np.testing.assert_allclose(landmarks, expected[1], atol=2e-4)
        np.testing.assert_allclose(probability, expected[2], atol=2e-4)
        probabilities.append(probability)
    found = np.concatenate(probabilities)
    # The crops hold faces and non-faces alike: the comparison covers both ends of the scale.
    assert (found > 0.9).sum() >= 20 and (found < 0.1).sum() >= 3


def test_verifier_on_ort_keeps_the_faces_scrfd_finds(settings: PipelineSettings) -> None:
    verifier = ONetVerifier.load(settings)
    image = rgb(vectron_image_path("gdp.jpg").read_bytes())
    boxes = SCRFDDetector.load(settings).detect(image).boxes
    probs = verifier.face_probability(image, boxes)
    assert probs.shape == (len(boxes),) and (probs > 0.88).all()
    assert verifier.face_probability(image, np.zeros((0, 4), np.float32)).shape == (0,)
    outside = np.array([[5000, 5000, 5100, 5100]], np.float32)
    np.testing.assert_array_equal(verifier.face_probability(image, outside), [0.0])


def test_default_pipeline_never_imports_torch(tmp_path: Path) -> None:
    """Load the default worker pipeline and group a photo in a fresh interpreter: torch stays
    out of sys.modules (MTCNN, the only torch model, is not the default detector)."""
    photo = vectron_image_path("gdp.jpg")
    script = f"""
import json, sys
from pathlib import Path
from worker.pipeline import FacePipeline, group_album
from worker.settings import PipelineSettings
from worker.types import PhotoSource
settings = PipelineSettings()
path = Path({str(photo)!r})
result = group_album(
    [PhotoSource(id="1", name=path.name, read=path.read_bytes)], settings
)
print(json.dumps({{
    "faces": len(result.faces),
    "models": [m.name for m in result.models],
    "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
}}))
"""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AFTERTRIP_MODEL_CACHE_DIR": str(tmp_path),
        "AFTERTRIP_DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["faces"] >= 3
    assert "mtcnn_onet" in report["models"]
    assert report["torch"] == []


@pytest.mark.parametrize(
    "window",
    [(0, 0, 1700, 1300), (7, 3, 1100, 1299), (5, 9, 53, 40), (3, 4, 5, 300), (0, 0, 47, 49)],
)
def test_area_crop_is_adaptive_average_pooling(window: tuple[int, int, int, int]) -> None:
    """The crop MTCNN sees, computed from bin sums, equals torch's adaptive average pooling of
    the window (large windows, windows smaller than the output, thin ones)."""
    image = np.random.default_rng(0).integers(0, 256, (1300, 1700, 3), dtype=np.uint8)
    x0, y0, x1, y1 = window
    region = torch.as_tensor(image[y0:y1, x0:x1].copy()).permute(2, 0, 1).float()
    expected = torch.nn.functional.adaptive_avg_pool2d(region.unsqueeze(0), 48)[0].numpy()
    np.testing.assert_allclose(area_crop(image, np.array(window), 48), expected, atol=1e-3)


@pytest.mark.parametrize("window", [(0, 0, 1700, 1300), (5, 9, 53, 40), (3, 4, 5, 300)])
def test_area_crop_integral_and_bins_agree_exactly(
    window: tuple[int, int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small windows are summed through OpenCV's integral image, large ones by bins: both
    give the same crop, to the bit, whichever a window gets."""
    import worker.onet

    image = np.random.default_rng(1).integers(0, 256, (1300, 1700, 3), dtype=np.uint8)
    crops = []
    for limit in (0, 1 << 30):  # everything by bins, then everything by the integral image
        monkeypatch.setattr(worker.onet, "INTEGRAL_MAX_PIXELS", limit)
        crops.append(area_crop(image, np.array(window), 48))
    np.testing.assert_array_equal(crops[0], crops[1])
