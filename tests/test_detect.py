"""The two face detectors on the shipped photos, SCRFD's decoding on a fake session, and the
team's detection sets (voc-faces recall, scenery false positives)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image

from bench.detection import box_iou, count_faces, photos_in, read_imglab, voc_recall
from worker.boxes import nms
from worker.detect import FaceDetector
from worker.errors import ModelError
from worker.mtcnn import PNet, pyramid_scales
from worker.scrfd import SCRFDDetector, anchor_centres, head_layout
from worker.settings import PipelineSettings
from worker.types import Detections
from worker.zoo import load_detector

DETECTORS = ("mtcnn", "scrfd")
# voc-faces: 43 labelled faces; measured recall at IoU 0.4: MTCNN 42/43, SCRFD 43/43.
VOC_RECALL_FLOOR = 0.95


def rgb(data: bytes) -> NDArray[np.uint8]:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def settings() -> PipelineSettings:
    return PipelineSettings(device="cpu")


def second_look(detector: FaceDetector) -> FaceDetector:
    """The detector's second-look layer: SCRFD's sits under its closer look."""
    from worker.closer import CloserLook

    return detector.coarse if isinstance(detector, CloserLook) else detector


@pytest.fixture(scope="module")
def detectors(settings: PipelineSettings) -> dict[str, FaceDetector]:
    return {
        name: load_detector(settings.model_copy(update={"detector": name})) for name in DETECTORS
    }


@pytest.fixture(scope="module")
def gdp(gdp_jpg: bytes) -> NDArray[np.uint8]:
    return rgb(gdp_jpg)


@pytest.fixture(scope="module")
def gdp_faces(detectors: dict[str, FaceDetector], gdp: NDArray[np.uint8]) -> dict[str, Detections]:
    return {name: det.detect(gdp) for name, det in detectors.items()}


@pytest.fixture(scope="module")
def players_faces(detectors: dict[str, FaceDetector], players_jpg: bytes) -> dict[str, Detections]:
    image = rgb(players_jpg)
    return {name: det.detect(image) for name, det in detectors.items()}


def sizes(found: Detections) -> NDArray[np.float32]:
    return np.maximum(found.boxes[:, 2] - found.boxes[:, 0], found.boxes[:, 3] - found.boxes[:, 1])


def check_shapes(found: Detections) -> None:
    n = len(found)
    assert found.boxes.shape == (n, 4) and found.boxes.dtype == np.float32
    assert found.scores.shape == (n,) and found.scores.dtype == np.float32
    assert found.landmarks.shape == (n, 5, 2) and found.landmarks.dtype == np.float32
    assert np.all(np.diff(found.scores) <= 0), "best score first"


# --- shipped photos -------------------------------------------------------------------------


@pytest.mark.parametrize("name", DETECTORS)
def test_gdp_three_players(name: str, gdp_faces: dict[str, Detections]) -> None:
    found = gdp_faces[name]
    check_shapes(found)
    # Three players fill the photo; blurred spectators at the left edge are small.
    big = found.select(sizes(found) >= 50)
    assert len(big) == 3
    centres_x = np.sort((big.boxes[:, 0] + big.boxes[:, 2]) / 2)
    np.testing.assert_allclose(centres_x, [160, 298, 380], atol=12)
    assert np.all(big.scores > 0.7)


@pytest.mark.parametrize("name", DETECTORS)
def test_yaoming_one_face(
    name: str, detectors: dict[str, FaceDetector], yaoming_jpg: bytes
) -> None:
    found = detectors[name].detect(rgb(yaoming_jpg))
    check_shapes(found)
    assert len(found) == 1
    x1, y1, x2, y2 = found.boxes[0]
    assert 60 < x1 < 80 and 65 < y1 < 80 and 165 < x2 < 185 and 200 < y2 < 220


# Centres of the 16 faces in the front of players.jpg (11 standing, 5 crouching), by eye.
PLAYERS_FRONT = [
    (38, 305), (144, 275), (254, 247), (361, 226), (474, 224), (597, 199), (742, 166),
    (892, 188), (1001, 228), (1068, 248), (1185, 281),
    (197, 445), (352, 442), (514, 461), (683, 465), (892, 458),
]  # fmt: skip


@pytest.mark.parametrize("name", DETECTORS)
def test_players_team_photo(name: str, players_faces: dict[str, Detections]) -> None:
    found = players_faces[name]
    check_shapes(found)
    big = found.select(sizes(found) >= 40)  # front faces are 42-58 px
    for x, y in PLAYERS_FRONT:
        inside = (big.boxes[:, 0] < x) & (x < big.boxes[:, 2])
        inside &= (big.boxes[:, 1] < y) & (y < big.boxes[:, 3])
        assert inside.sum() == 1, f"face at {x},{y}"
    # The crowd behind is small and blurred; one spectator's face is big enough to count.
    assert len(big) <= 17


@pytest.mark.parametrize("name", DETECTORS)
def test_landmarks_inside_boxes_and_upright(
    name: str, gdp_faces: dict[str, Detections], players_faces: dict[str, Detections]
) -> None:
    for found in (gdp_faces[name], players_faces[name]):
        found = found.select(sizes(found) >= 30)
        box, lm = found.boxes, found.landmarks
        margin = 0.1 * sizes(found)[:, None]
        assert np.all(lm[:, :, 0] >= box[:, 0:1] - margin)
        assert np.all(lm[:, :, 0] <= box[:, 2:3] + margin)
        assert np.all(lm[:, :, 1] >= box[:, 1:2] - margin)
        assert np.all(lm[:, :, 1] <= box[:, 3:4] + margin)
        left_eye, right_eye, nose, left_mouth, right_mouth = lm.transpose(1, 0, 2)
        # Order of the ArcFace template: image-left before image-right; eyes, nose, mouth.
        assert np.all(left_eye[:, 0] < right_eye[:, 0])
        assert np.all(left_mouth[:, 0] < right_mouth[:, 0])
        assert np.all(np.maximum(left_eye[:, 1], right_eye[:, 1]) < nose[:, 1])
        assert np.all(nose[:, 1] < np.minimum(left_mouth[:, 1], right_mouth[:, 1]))


@pytest.mark.parametrize("name", DETECTORS)
def test_blank_and_noise_have_no_face(name: str, detectors: dict[str, FaceDetector]) -> None:
    rng = np.random.default_rng(0)
    blank = np.full((480, 640, 3), 200, np.uint8)
    noise = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    tiny = np.zeros((8, 8, 3), np.uint8)  # below MTCNN's 12-pixel window
    for image in (blank, noise, tiny):
        found = detectors[name].detect(image)
        assert len(found) == 0
        check_shapes(found)


def test_detectors_agree_on_gdp(gdp_faces: dict[str, Detections]) -> None:
    mtcnn = gdp_faces["mtcnn"].select(sizes(gdp_faces["mtcnn"]) >= 50)
    scrfd = gdp_faces["scrfd"].select(sizes(gdp_faces["scrfd"]) >= 50)
    overlap = box_iou(mtcnn.boxes, scrfd.boxes)
    assert overlap.shape == (3, 3)
    assert np.all(overlap.max(axis=1) > 0.5)
    # Same landmarks to within a few pixels: both feed the same alignment.
    match = overlap.argmax(axis=1)
    err = np.linalg.norm(mtcnn.landmarks - scrfd.landmarks[match], axis=2) / sizes(mtcnn)[:, None]
    assert err.max() < 0.15


@pytest.mark.parametrize("name", DETECTORS)
def test_mirrored_image_gives_mirrored_faces(
    name: str,
    detectors: dict[str, FaceDetector],
    gdp: NDArray[np.uint8],
    gdp_faces: dict[str, Detections],
) -> None:
    width = gdp.shape[1]
    found = gdp_faces[name].select(sizes(gdp_faces[name]) >= 50)
    mirrored = detectors[name].detect(gdp[:, ::-1])  # a negative-stride view on purpose
    mirrored = mirrored.select(sizes(mirrored) >= 50)
    assert len(mirrored) == len(found) == 3
    expected = found.boxes.copy()
    expected[:, [0, 2]] = width - found.boxes[:, [2, 0]]
    overlap = box_iou(expected, mirrored.boxes)
    assert np.all(overlap.max(axis=1) > 0.8)
    # The left eye is still the image-left one: mirroring swaps the landmark roles.
    match = overlap.argmax(axis=1)
    swapped = found.landmarks[:, [1, 0, 2, 4, 3]].copy()
    swapped[:, :, 0] = width - swapped[:, :, 0]
    err = np.linalg.norm(mirrored.landmarks[match] - swapped, axis=2) / sizes(found)[:, None]
    assert err.max() < 0.1


@pytest.mark.parametrize("name", DETECTORS)
def test_transposed_canvas_gives_shifted_faces(
    name: str,
    detectors: dict[str, FaceDetector],
    gdp: NDArray[np.uint8],
    gdp_faces: dict[str, Detections],
) -> None:
    # gdp is portrait; put it into a landscape canvas to catch height/width mix-ups.
    height, width = gdp.shape[:2]
    canvas = np.full((height + 40, 2 * width, 3), 90, np.uint8)
    canvas[25 : 25 + height, 300 : 300 + width] = gdp
    found = gdp_faces[name].select(sizes(gdp_faces[name]) >= 50)
    moved = detectors[name].detect(canvas)
    moved = moved.select(sizes(moved) >= 50)
    expected = found.boxes + np.array([300, 25, 300, 25], np.float32)
    overlap = box_iou(expected, moved.boxes)
    # SCRFD sees the wider canvas at a smaller scale, so its boxes move a little.
    assert len(moved) == 3 and np.all(overlap.max(axis=1) > 0.7)


@pytest.mark.parametrize("name", DETECTORS)
def test_threshold_and_min_face_size_settings(
    name: str, settings: PipelineSettings, gdp: NDArray[np.uint8], gdp_faces: dict[str, Detections]
) -> None:
    default = gdp_faces[name]
    assert len(default) > 3  # background spectators at the left edge
    threshold = {"mtcnn": 0.95, "scrfd": 0.7}[name]  # SCRFD's scores run lower
    strict = load_detector(
        settings.model_copy(update={"detector": name, "detection_threshold": threshold})
    )
    found = strict.detect(gdp)
    assert 3 <= len(found) < len(default) and np.all(found.scores >= threshold)
    big_only = load_detector(settings.model_copy(update={"detector": name, "min_face_size": 50}))
    found = big_only.detect(gdp)
    assert np.all(sizes(found) >= 50) and len(found) < len(default)
    # MTCNN's coarser pyramid at 50 px finds one more blurred spectator top right.
    assert 3 <= len(found) <= 4 and np.all(found.scores[:3] > 0.7)


def test_detector_models_are_recorded(detectors: dict[str, FaceDetector]) -> None:
    assert [m.name for m in detectors["mtcnn"].models] == ["mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"]
    # SCRFD's faces are verified by MTCNN's ONet (worker.detect.VerifiedDetector).
    assert [m.name for m in detectors["scrfd"].models] == ["scrfd_500m_bnkps", "mtcnn_onet"]
    assert all(len(m.sha256) == 64 for d in detectors.values() for m in d.models)


def test_scrfd_rejects_odd_input_size(settings: PipelineSettings) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        SCRFDDetector.load(settings.model_copy(update={"scrfd_input_size": 650}))


# --- MTCNN pieces ---------------------------------------------------------------------------


def test_pyramid_scales() -> None:
    scales = pyramid_scales(480, 640, 20)
    assert scales[0] == pytest.approx(12 / 20)
    assert np.allclose(np.diff(np.log(scales)), np.log(0.709))
    assert 480 * scales[-1] >= 12 > 480 * scales[-1] * 0.709
    assert pyramid_scales(10, 10, 20) == []


def test_pnet_weights_load_by_name() -> None:
    from worker.models import resolve_model

    state = torch.load(resolve_model("mtcnn_pnet").path, map_location="cpu", weights_only=True)
    net = PNet()
    net.load_state_dict(state)  # strict: every facenet-pytorch name matches ours
    offsets, probs = net(torch.zeros(1, 3, 12, 12))
    assert offsets.shape == (1, 4, 1, 1) and probs.shape == (1, 1, 1)


def test_nms_union_and_min() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 6, 6], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [0, 3]


# --- SCRFD decoding on a fake session -------------------------------------------------------


class FakeSCRFDSession:
    """An ONNX session stand-in: one face at one anchor of stride 8, outputs in any order."""

    def __init__(self, output_names: list[str]) -> None:
        self.output_names = output_names
        self.feeds: list[dict[str, Any]] = []

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="input.1")]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=n) for n in self.output_names]

    def run(self, names: list[str], feed: dict[str, Any]) -> list[NDArray[np.float32]]:
        self.feeds.append(feed)
        height, width = feed["input.1"].shape[2:]
        out: dict[str, NDArray[np.float32]] = {}
        for stride in (8, 16, 32):
            n = (height // stride) * (width // stride) * 2
            out[f"score_{stride}"] = np.zeros((1, n, 1), np.float32)
            out[f"bbox_{stride}"] = np.ones((1, n, 4), np.float32)
            out[f"kps_{stride}"] = np.zeros((1, n, 10), np.float32)
        # Anchor point (x=10, y=5) at stride 8, second anchor: centre (80, 40) in input pixels.
        index = (5 * (width // 8) + 10) * 2 + 1
        out["score_8"][0, index, 0] = 0.9
        out["bbox_8"][0, index] = [1.0, 2.0, 3.0, 4.0]  # left, top, right, bottom in strides
        out["kps_8"][0, index] = [-1, -1, 1, -1, 0, 0, -1, 1, 1, 1]
        # A weaker duplicate next to it, removed by NMS.
        out["score_8"][0, index + 2, 0] = 0.6
        out["bbox_8"][0, index + 2] = [1.0, 2.0, 3.0, 4.0]
        return [out[n] for n in names]


def fake_scrfd(session: FakeSCRFDSession, **kwargs: Any) -> SCRFDDetector:
    return SCRFDDetector(session, models=[], **kwargs)


def test_scrfd_decoding_math() -> None:
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    session = FakeSCRFDSession(names[::-1])  # outputs found by name, not position
    image = np.full((300, 1280, 3), 255, np.uint8)  # scale 0.5: 640x150, padded to 640x160
    found = fake_scrfd(session, min_face_size=10).detect(image)
    blob = session.feeds[0]["input.1"]
    assert blob.shape == (1, 3, 160, 640) and blob.dtype == np.float32
    assert blob[0, :, :150].min() == pytest.approx(127.5 / 128)
    assert blob[0, :, 150:].max() == pytest.approx(-127.5 / 128)
    assert len(found) == 1
    # Box: centre (80, 40) minus (8, 16), plus (24, 32) -> (72, 24, 104, 72), then / 0.5.
    np.testing.assert_allclose(found.boxes[0], [144, 48, 208, 144])
    assert found.scores[0] == pytest.approx(0.9)
    expected_kps = (np.array([[-1, -1], [1, -1], [0, 0], [-1, 1], [1, 1]]) * 8 + [80, 40]) * 2
    np.testing.assert_allclose(found.landmarks[0], expected_kps)


def test_scrfd_threshold_and_min_size_on_fake_session() -> None:
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    image = np.zeros((640, 640, 3), np.uint8)
    assert len(fake_scrfd(FakeSCRFDSession(names), threshold=0.95).detect(image)) == 0
    assert len(fake_scrfd(FakeSCRFDSession(names), threshold=0.5).detect(image)) == 1
    # The face is 32x48 px at scale 1: 48 is its size.
    assert len(fake_scrfd(FakeSCRFDSession(names), min_face_size=48).detect(image)) == 1
    assert len(fake_scrfd(FakeSCRFDSession(names), min_face_size=49).detect(image)) == 0


def test_scrfd_head_layout() -> None:
    by_position = head_layout([str(i) for i in range(9)])
    assert by_position.strides == (8, 16, 32) and by_position.anchors_per_point == 2
    assert by_position.score_names == ("0", "1", "2") and by_position.kps_names == ("6", "7", "8")
    five = head_layout([f"{k}_{s}" for s in (8, 16, 32, 64, 128) for k in ("kps", "bbox", "score")])
    assert five.strides == (8, 16, 32, 64, 128) and five.anchors_per_point == 1
    assert five.bbox_names[4] == "bbox_128"
    with pytest.raises(ModelError, match="five landmarks"):
        head_layout([f"{k}_{s}" for k in ("score", "bbox") for s in (8, 16, 32)])


def test_anchor_centres_order() -> None:
    centres = anchor_centres(2, 3, 16, 2)
    assert centres.tolist()[:4] == [[0, 0], [0, 0], [16, 0], [16, 0]]
    assert centres.tolist()[6] == [0, 16]


# --- the team's detection sets (../shared) --------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize("name", DETECTORS)
def test_scenery_has_no_faces(
    name: str, shared_data: Path, detectors: dict[str, FaceDetector], settings: PipelineSettings
) -> None:
    result = count_faces(detectors[name], photos_in(shared_data / "scenery"), settings)
    assert result["images"] == 9
    assert result["faces"] == 0, result["faces_per_image"]


@pytest.mark.shared
@pytest.mark.parametrize("name", DETECTORS)
def test_voc_faces_recall(
    name: str, shared_data: Path, detectors: dict[str, FaceDetector], settings: PipelineSettings
) -> None:
    folder = shared_data / "detection" / "voc-faces"
    labels = read_imglab(folder / "training.xml")
    assert sum(len(b) for b in labels.values()) > 0
    result = voc_recall(detectors[name], folder, settings)
    assert result["faces"] == 43
    assert result["recall"] >= VOC_RECALL_FLOOR, result["missed"]
    assert result["extra"] <= 3


def test_scrfd_weights_from_a_path_are_checked(settings: PipelineSettings) -> None:
    from worker.errors import ModelChecksumMismatch
    from worker.models import REGISTRY, resolve_model

    path = resolve_model("scrfd_500m_bnkps").path
    good = settings.model_copy(
        update={"scrfd_path": path, "scrfd_sha256": REGISTRY["scrfd_500m_bnkps"].sha256}
    )
    assert SCRFDDetector.load(good).models[0].path == path
    with pytest.raises(ModelChecksumMismatch, match="sha256"):
        SCRFDDetector.load(
            settings.model_copy(update={"scrfd_path": path, "scrfd_sha256": "0" * 64})
        )


def test_scrfd_faces_are_verified_by_onet(gdp_jpg: bytes, shared_data) -> None:
    """SCRFD fires on a dog's face; the ONet second opinion keeps real faces only."""
    from worker.detect import SecondLook, VerifiedDetector
    from worker.images import decode_image

    verified = load_detector(PipelineSettings(detector="scrfd"))
    look = second_look(verified)
    assert isinstance(look, SecondLook) and isinstance(look.inner, VerifiedDetector)
    assert {m.name for m in verified.models} >= {"scrfd_500m_bnkps", "mtcnn_onet"}
    raw = load_detector(PipelineSettings(detector="scrfd", verify_threshold=0))
    small = decode_image(
        (shared_data / "albums/seed-glory/user2/dog.jpg").read_bytes(), name="dog.jpg"
    ).pixels
    # The album's copy is 275 px wide; at a phone photo's size SCRFD takes the dog for a face.
    dog = np.ascontiguousarray(np.kron(small, np.ones((3, 3, 1), np.uint8)))
    assert len(raw.detect(dog)) == 1  # the unverified detector's false positive
    assert len(verified.detect(dog)) == 0
    people = decode_image(gdp_jpg, name="gdp.jpg").pixels
    assert len(verified.detect(people)) == len(raw.detect(people))


def test_scrfd_finds_a_face_that_fills_the_frame(gdp: NDArray[np.uint8]) -> None:
    """A close-up whose face fills the photo (a selfie, a portrait crop) outgrows SCRFD's
    anchors; the framed second look finds it, with the box and landmarks in the photo's
    pixels. Photos with a face found are not looked at twice."""
    import cv2

    from worker.detect import SecondLook

    detector = load_detector(PipelineSettings(detector="scrfd"))
    assert isinstance(second_look(detector), SecondLook)
    x1, y1, x2, y2 = detector.detect(gdp).boxes[0]
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 0.55
    crop = gdp[int(cy - half) : int(cy + half), int(cx - half) : int(cx + half)]
    close_up = np.ascontiguousarray(cv2.resize(crop, (800, 800), interpolation=cv2.INTER_CUBIC))
    assert len(second_look(detector).inner.detect(close_up)) == 0
    found = detector.detect(close_up)
    assert len(found) == 1
    check_shapes(found)
    x1, y1, x2, y2 = found.boxes[0]
    assert 0 <= x1 < 200 and 0 <= y1 < 200 and 600 < x2 <= 800 and 600 < y2 <= 800
    eyes = found.landmarks[0, :2]
    assert (eyes[:, 1] < 450).all() and eyes[0, 0] < eyes[1, 0]
    off = load_detector(PipelineSettings(detector="scrfd", retry_margin=0))
    assert len(off.detect(close_up)) == 0

    calls: list[tuple[int, ...]] = []

    class Counting:
        name, models = "counting", []

        def detect(self, image: NDArray[np.uint8]) -> Detections:
            calls.append(image.shape)
            return second_look(detector).inner.detect(image)

    SecondLook(Counting(), margin=0.4, rotated=True).detect(gdp)
    assert calls == [gdp.shape]


@pytest.mark.parametrize("name", DETECTORS)
@pytest.mark.parametrize("quarter", [1, -1])
def test_second_look_finds_faces_lying_on_their_side(
    name: str, quarter: int, yaoming_jpg: bytes, detectors: dict[str, FaceDetector]
) -> None:
    """A photo turned a quarter: no face upright, so the detector looks at it turned back, and
    the face comes out in the turned photo's pixels with landmarks that align it upright."""
    from worker.align import align_faces
    from worker.detect import SecondLook
    from worker.embed import ArcFaceEmbedder

    detector = detectors[name]
    assert isinstance(second_look(detector), SecondLook)
    photo = rgb(yaoming_jpg)
    upright = detector.detect(photo)
    turned = np.ascontiguousarray(np.rot90(photo, quarter))
    assert len(second_look(detector).inner.detect(turned)) == 0
    found = detector.detect(turned)
    assert len(found) == 1
    check_shapes(found)
    # The box is the upright box turned with the photo.
    corners = upright.boxes[0].reshape(2, 2)
    h, w = photo.shape[:2]
    if quarter == 1:  # counter-clockwise: (x, y) -> (y, w - x)
        moved = np.stack([corners[:, 1], w - corners[:, 0]], axis=1)
    else:  # clockwise: (x, y) -> (h - y, x)
        moved = np.stack([h - corners[:, 1], corners[:, 0]], axis=1)
    expected = np.concatenate([moved.min(axis=0), moved.max(axis=0)])
    assert box_iou(found.boxes[:1], expected[None])[0, 0] > 0.8
    embedder = ArcFaceEmbedder.load(PipelineSettings())
    a = embedder.embed(align_faces(photo, upright.landmarks))
    b = embedder.embed(align_faces(turned, found.landmarks))
    assert float(a[0] @ b[0]) > 0.9


def test_mtcnn_close_up_is_looked_at_framed(players_jpg: bytes) -> None:
    """A face cut off by the frame: MTCNN squeezes its landmarks into the photo, so the chip
    is misaligned; framed, the landmarks are right and the face is recognised again."""
    import cv2

    from worker.align import align_faces
    from worker.detect import SecondLook, close_up
    from worker.embed import ArcFaceEmbedder

    detector = load_detector(PipelineSettings(detector="mtcnn"))
    assert isinstance(detector, SecondLook) and detector.close_ups
    embedder = ArcFaceEmbedder.load(PipelineSettings())
    photo = rgb(players_jpg)
    found = detector.detect(photo)
    reference = embedder.embed(align_faces(photo, found.landmarks[:1]))[0]
    x1, y1, x2, y2 = found.boxes[0]
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 0.45
    crop = photo[int(cy - half) : int(cy + half), int(cx - half) : int(cx + half)]
    close = np.ascontiguousarray(cv2.resize(crop, (400, 400), interpolation=cv2.INTER_CUBIC))
    squeezed = detector.inner.detect(close)
    assert len(squeezed) == 1 and close_up(squeezed.boxes, 400, 400).all()
    looked = detector.detect(close)
    assert len(looked) == 1

    def similarity(faces: Detections) -> float:
        return float(embedder.embed(align_faces(close, faces.landmarks))[0] @ reference)

    assert similarity(squeezed) < 0.8 < 0.85 < similarity(looked)
