"""The whole pipeline on real photos and weights: grouping, orientation, formats, bad input."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from tests.support.files import STORE_FOR_ORIENTATION
from worker.boxes import box_iou
from worker.pipeline import FacePipeline, group_album
from worker.settings import PipelineSettings
from worker.types import NO_FACE_GROUP, AlbumResult, PhotoSource, PhotoStatus

pillow_heif.register_heif_opener()

SETTINGS = PipelineSettings(max_image_pixels=50_000_000)


@pytest.fixture(scope="module")
def pipeline() -> FacePipeline:
    return FacePipeline(SETTINGS)


def source(name: str, data: bytes) -> PhotoSource:
    return PhotoSource(id=name, name=name, read=lambda: data)


def jpeg(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **params)
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def largest_face(result: AlbumResult, photo_id: str) -> int:
    faces = [f for f in result.faces if f.photo_id == photo_id]
    assert faces, f"no face found in {photo_id}"
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])).id


def iou(a: list[float], b: list[float]) -> float:
    return float(box_iou(np.array([a]), np.array([b]))[0, 0])


def photo(result: AlbumResult, photo_id: str):
    return next(p for p in result.photos if p.id == photo_id)


def test_demo_album_groups_yao_ming_and_keeps_strangers_apart(
    pipeline: FacePipeline, players_jpg: bytes, yaoming_jpg: bytes, gdp_jpg: bytes
) -> None:
    blank = jpeg(Image.new("RGB", (400, 300), (120, 160, 200)))
    result = group_album(
        [
            source("players.jpg", players_jpg),
            source("yaoming.jpg", yaoming_jpg),
            source("gdp.jpg", gdp_jpg),
            source("sky.jpg", blank),
        ],
        SETTINGS,
        pipeline=pipeline,
    )
    yao = result.faces[largest_face(result, "yaoming.jpg")]
    assert yao.group >= 0, "Yao Ming's portrait found no match in the team photo"
    group = next(g for g in result.groups if g.idx == yao.group)
    assert group.photo_ids == ["players.jpg", "yaoming.jpg"]
    assert photo(result, "yaoming.jpg").group_idx == [yao.group]
    # The three Spurs players are three people: no two of them share a folder.
    gdp_faces = sorted(
        (f for f in result.faces if f.photo_id == "gdp.jpg"),
        key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]),
    )[:3]
    assert len(gdp_faces) == 3
    labels = [f.group for f in gdp_faces if f.group >= 0]
    assert len(labels) == len(set(labels))
    assert photo(result, "sky.jpg").group_idx == [NO_FACE_GROUP]
    # Explainability: every grouped face names the face it matched and how similar they were.
    for face in result.faces:
        if face.group >= 0:
            assert face.matched_face is not None and face.similarity is not None
            assert result.faces[face.matched_face].group == face.group
    assert result.group_idx_list == [g.idx for g in result.groups]
    assert {m.role for m in result.models} == {"detector", "embedder"}


def test_every_exif_orientation_gives_the_same_face_and_group(
    pipeline: FacePipeline, players_jpg: bytes, yaoming_jpg: bytes
) -> None:
    upright = Image.open(io.BytesIO(yaoming_jpg)).convert("RGB")
    sources = [source("players.jpg", players_jpg)]
    for tag, op in STORE_FOR_ORIENTATION.items():
        stored = upright if op is None else upright.transpose(op)
        exif = Image.Exif()
        exif[0x0112] = tag
        sources.append(source(f"yao-{tag}.jpg", jpeg(stored, exif=exif.tobytes())))
    result = group_album(sources, SETTINGS, pipeline=pipeline)
    boxes = []
    groups = set()
    for tag in STORE_FOR_ORIENTATION:
        p = photo(result, f"yao-{tag}.jpg")
        assert (p.width, p.height) == upright.size, tag
        face = result.faces[largest_face(result, p.id)]
        boxes.append(face.box)
        groups.add(face.group)
    spread = np.ptp(np.array(boxes), axis=0)
    assert spread.max() < 6, f"face boxes differ across orientations by {spread} px"
    assert len(groups) == 1 and groups.pop() >= 0


def test_phone_formats_decode_and_group_like_the_original(
    pipeline: FacePipeline, players_jpg: bytes, yaoming_jpg: bytes
) -> None:
    original = Image.open(io.BytesIO(yaoming_jpg)).convert("RGB")
    rgba = original.convert("RGBA")
    copies = {
        "yao.heic": encoded(original, "HEIF", quality=90),
        "yao.avif": encoded(original, "AVIF", quality=90),
        "yao.webp": encoded(original, "WEBP", quality=90),
        "yao-rgba.png": encoded(rgba, "PNG"),
        "yao-cmyk.jpg": encoded(original.convert("CMYK"), "JPEG", quality=95),
        "yao-gray.jpg": encoded(original.convert("L"), "JPEG", quality=95),
    }
    sources = [source("players.jpg", players_jpg), source("yao.jpg", yaoming_jpg)]
    sources += [source(name, data) for name, data in copies.items()]
    result = group_album(sources, SETTINGS, pipeline=pipeline)
    reference = result.faces[largest_face(result, "yao.jpg")]
    assert reference.group >= 0
    for name in copies:
        p = photo(result, name)
        assert p.status is PhotoStatus.OK, (name, p.error)
        assert (p.width, p.height) == original.size
        face = result.faces[largest_face(result, name)]
        assert face.group == reference.group, name
        # Colour changes (grey, CMYK) move the detector a little; the face stays put.
        assert iou(face.box, reference.box) > 0.85, name


def test_each_bad_photo_gets_its_own_status_and_the_album_still_groups(
    pipeline: FacePipeline, players_jpg: bytes, yaoming_jpg: bytes
) -> None:
    bomb = encoded(Image.new("1", (10_000, 10_000)), "PNG")  # 100 Mpx in a few KB
    panorama = np.tile(np.linspace(0, 255, 20_000, dtype=np.uint8)[None, :, None], (200, 1, 3))

    def missing() -> bytes:
        from worker.errors import PhotoUnreadable

        raise PhotoUnreadable("gone.jpg", "no such object")

    sources = [
        source("players.jpg", players_jpg),
        source("truncated.jpg", yaoming_jpg[: len(yaoming_jpg) // 2]),
        source("empty.jpg", b""),
        source("notes.jpg", b"these are my trip notes, not a photo\n"),
        source("bomb.png", bomb),
        source("dot.png", encoded(Image.new("RGB", (1, 1)), "PNG")),
        source("panorama.jpg", jpeg(Image.fromarray(panorama))),
        PhotoSource(id="gone.jpg", name="gone.jpg", read=missing),
        source("yaoming.jpg", yaoming_jpg),
    ]
    result = group_album(sources, SETTINGS, pipeline=pipeline)
    expected = {
        "truncated.jpg": PhotoStatus.CORRUPT,
        "empty.jpg": PhotoStatus.CORRUPT,
        "notes.jpg": PhotoStatus.UNSUPPORTED,
        "bomb.png": PhotoStatus.TOO_LARGE,
        "dot.png": PhotoStatus.TOO_SMALL,
        "gone.jpg": PhotoStatus.MISSING,
    }
    for name, status in expected.items():
        p = photo(result, name)
        assert p.status is status, (name, p.status, p.error)
        assert p.error and len(p.error) > 5
        assert p.group_idx == []
    pano = photo(result, "panorama.jpg")
    assert pano.status is PhotoStatus.OK and (pano.width, pano.height) == (20_000, 200)
    assert pano.group_idx == [NO_FACE_GROUP]
    yao = result.faces[largest_face(result, "yaoming.jpg")]
    assert yao.group >= 0
    assert "players.jpg" in next(g for g in result.groups if g.idx == yao.group).photo_ids


def test_streaming_keeps_input_order_across_embedding_batches(
    players_jpg: bytes, yaoming_jpg: bytes
) -> None:
    settings = SETTINGS.model_copy(update={"embed_batch_size": 4, "prefetch": 2})
    small = FacePipeline(settings)
    names = [f"p{i}.jpg" for i in range(5)]
    data = [players_jpg, yaoming_jpg, b"", yaoming_jpg, players_jpg]
    out = list(small.analyze([source(n, d) for n, d in zip(names, data, strict=True)]))
    assert [p.photo_id for p in out] == names
    assert [len(p.detections) for p in out][0] == len(out[4].detections) > 4
    for p in out:
        assert p.embeddings.shape == (len(p.detections), 512)
        if len(p.embeddings):
            assert np.allclose(np.linalg.norm(p.embeddings, axis=1), 1.0, atol=1e-4)
    # The same photo in two different batches: the same faces (a GPU's kernels may differ in
    # the last digits between batch shapes; one face against another differs by ~0.1).
    np.testing.assert_allclose(out[0].embeddings, out[4].embeddings, atol=1e-3)


def test_embedding_runs_beside_detection_and_its_errors_reach_the_caller(
    players_jpg: bytes, yaoming_jpg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chips are embedded on a thread of their own while the next photos are detected; the
    photos still come out in order, and an embedder failure is raised to the caller."""
    import threading
    import time

    settings = SETTINGS.model_copy(update={"embed_batch_size": 2, "prefetch": 2})
    small = FacePipeline(settings)
    detector, embedder = small.detector, small.arcface
    events: list[tuple[str, str, float, float]] = []
    # the pipeline asks SCRFD's closer look for a photo's faces with the photo's scale
    method = "detect_photo" if hasattr(detector, "detect_photo") else "detect"
    real_detect, real_embed = getattr(detector, method), embedder.embed

    def detect(*args):  # noqa: ANN002, ANN202 - a recording wrapper
        start = time.monotonic()
        found = real_detect(*args)
        events.append(("detect", threading.current_thread().name, start, time.monotonic()))
        return found

    def slow_embed(chips):  # noqa: ANN001, ANN202
        start = time.monotonic()
        time.sleep(0.3)
        vectors = real_embed(chips)
        events.append(("embed", threading.current_thread().name, start, time.monotonic()))
        return vectors

    monkeypatch.setattr(detector, method, detect)
    monkeypatch.setattr(embedder, "embed", slow_embed)
    names = [f"p{i}.jpg" for i in range(6)]
    photos = [source(n, yaoming_jpg if i % 2 else players_jpg) for i, n in enumerate(names)]
    out = list(small.analyze(photos))
    assert [p.photo_id for p in out] == names
    assert all(p.embeddings.shape == (len(p.detections), 512) for p in out)
    embeds = [e for e in events if e[0] == "embed"]
    detects = [e for e in events if e[0] == "detect"]
    assert embeds and all(e[1] != threading.current_thread().name for e in embeds)
    assert any(d[2] < e[3] and e[2] < d[3] for d in detects for e in embeds), "no overlap"

    def broken(chips):  # noqa: ANN001, ANN202
        raise RuntimeError("embedder broke")

    monkeypatch.setattr(embedder, "embed", broken)
    with pytest.raises(RuntimeError, match="embedder broke"):
        list(small.analyze(photos))


def test_seed_album_from_the_prototype(pipeline: FacePipeline, shared_data) -> None:
    album = sorted((shared_data / "albums" / "seed-glory").rglob("*.jpg"))
    assert album, "albums/seed-glory is empty"
    result = group_album(
        [source(p.name, p.read_bytes()) for p in album], SETTINGS, pipeline=pipeline
    )

    def groups_of(name: str) -> list[int]:
        return photo(result, name).group_idx

    for name in ("apple.jpg", "cat.jpg", "dog.jpg"):
        assert groups_of(name) == [NO_FACE_GROUP], name
    kyo = result.faces[largest_face(result, "kyo.jpg")].group
    assert kyo >= 0 and result.faces[largest_face(result, "kyo2.jpg")].group == kyo
    yeon = [p.name for p in album if p.name.startswith("yeon")]
    yeon_groups = {result.faces[largest_face(result, n)].group for n in yeon}
    assert len(yeon_groups) == 1 and yeon_groups.pop() >= 0


def test_exif_rotated_portrait_gives_the_same_face(pipeline: FacePipeline, shared_data) -> None:
    folder = shared_data / "exif"
    names = ["portrait.jpg", "portrait-orientation-6.jpg"]
    result = group_album(
        [source(n, (folder / n).read_bytes()) for n in names], SETTINGS, pipeline=pipeline
    )
    a, b = (result.faces[largest_face(result, n)] for n in names)
    assert iou(a.box, b.box) > 0.9
    assert a.group == b.group >= 0


def test_a_read_that_fails_the_job_comes_after_every_photo_read_before_it(
    players_jpg: bytes, yaoming_jpg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage outage (an error that is not the photo's own) is raised to the caller, but
    only after the photos read before it have come out with their embeddings, even those
    still waiting on the embedding thread: a job that stores photos as they come loses only
    the unread ones."""
    import time

    settings = SETTINGS.model_copy(update={"embed_batch_size": 1, "prefetch": 4})
    small = FacePipeline(settings)
    embedder = small.arcface
    real_embed = embedder.embed

    def slow_embed(chips):  # noqa: ANN001, ANN202 - embedding lags behind the reads
        time.sleep(0.3)
        return real_embed(chips)

    monkeypatch.setattr(embedder, "embed", slow_embed)

    def outage() -> bytes:
        raise ConnectionError("storage is down")

    photos = [source(f"p{i}.jpg", yaoming_jpg if i % 2 else players_jpg) for i in range(3)]
    photos.append(PhotoSource(id="p3.jpg", name="p3.jpg", read=outage))
    photos.append(source("p4.jpg", yaoming_jpg))
    out = []
    with pytest.raises(ConnectionError, match="storage is down"):
        for photo in small.analyze(photos):
            out.append(photo)
    assert [p.photo_id for p in out] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert all(len(p.detections) and p.embeddings.shape == (len(p.detections), 512) for p in out)


def test_a_failed_read_starts_none_of_the_photos_queued_behind_it(
    players_jpg: bytes, yaoming_jpg: bytes
) -> None:
    """Photos are read ahead; once a read has failed the job, the photos queued behind it
    are not read at all (only a read already under way finishes)."""
    import threading
    import time

    small = FacePipeline(SETTINGS.model_copy(update={"decode_workers": 1, "prefetch": 4}))
    late_reads: list[str] = []
    # Set when the pipeline asks for the photo after the first four: it has analysed p0 and
    # turns to p1's failure. A read waits for it, so that it is still under way when the
    # failure reaches the pipeline however long p0 took (seconds, on a loaded machine).
    turned_to_p1 = threading.Event()

    def outage() -> bytes:
        raise ConnectionError("storage is down")

    def slow(name: str) -> PhotoSource:
        def read() -> bytes:
            late_reads.append(name)
            turned_to_p1.wait(timeout=120)
            time.sleep(1.0)  # still reading when the failure reaches the pipeline
            return yaoming_jpg

        return PhotoSource(id=name, name=name, read=read)

    photos = [source("p0.jpg", players_jpg), PhotoSource(id="p1.jpg", name="p1.jpg", read=outage)]
    photos += [slow(f"p{i}.jpg") for i in range(2, 7)]

    def handed_out() -> Iterator[PhotoSource]:
        for n, photo in enumerate(photos):
            if n == 4:
                turned_to_p1.set()
            yield photo

    with pytest.raises(ConnectionError, match="storage is down"):
        list(small.analyze(handed_out()))
    # p2 is read if the one decode thread took it before the failure arrived; never more.
    assert set(late_reads) <= {"p2.jpg"}, late_reads
