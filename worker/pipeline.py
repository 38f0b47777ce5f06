"""The streaming pipeline: photos in, grouped faces out, with bounded memory.

Photos are read and decoded ahead on a small thread pool (reading may be network I/O;
decoding releases the GIL), detected and aligned in order, and their chips embedded in
batches across photos on a thread of their own, while the next photos are detected.
Decoded pixels are dropped as soon as a photo's chips are cut, so memory depends on the
prefetch window and batch size, not on the album's size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from worker.align import align_faces
from worker.boxes import face_size
from worker.closer import detect_photo
from worker.cluster import MIN_DETECTION_SCORE, Clustering, cluster_faces
from worker.detect import FaceDetector
from worker.embed import ArcFaceEmbedder
from worker.errors import PhotoError
from worker.images import decode_image, encode_jpeg
from worker.models import RemoteFetcher
from worker.neardup import follow_near_duplicates
from worker.rules import cover_faces, photo_groups, small_faces
from worker.runtime import (
    TRIM_EVERY_PHOTOS,
    decode_threads,
    limit_image_threads,
    release_freed_memory,
)
from worker.settings import PipelineSettings
from worker.types import (
    SINGLE_FACE_GROUP,
    AlbumResult,
    DecodedImage,
    Detections,
    FaceResult,
    ModelInfo,
    PersonGroup,
    PhotoResult,
    PhotoSource,
    PhotoStatus,
)
from worker.zoo import load_detector, load_embedder

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""Called as (stage, done, total) while an album is processed."""

FACE_THUMBNAIL_SIDE = 160
PHOTO_PREVIEW_SIDE = 320


class StageTimer:
    """Seconds spent per stage, summed over photos (decode time is summed over threads;
    embedding overlaps detection, so the stages add up to more than the wall time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()  # stages run on several threads

    def add(self, stage: str, seconds: float) -> None:
        """Account `seconds` to `stage`."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)


@dataclass
class AnalyzedPhoto:
    """One photo after decode, detect, align and embed; no pixels are kept."""

    photo_id: str
    name: str
    status: PhotoStatus
    error: str | None
    width: int | None
    height: int | None
    detections: Detections
    embeddings: NDArray[np.float32]
    thumbnails: list[bytes] = field(default_factory=list)
    preview: bytes | None = None
    chips: NDArray[np.uint8] | None = None
    working_scale: float = 1.0
    """Working pixels per photo pixel: the chips were cut from pixels this much smaller."""

    def chip_sizes(self) -> NDArray[np.float32]:
        """Each face's size in the pixels its chip was cut from (what `small_faces` judges);
        the trip write stores it with the face as `FoundFace.chip_size`."""
        return (face_size(self.detections.boxes) * self.working_scale).astype(np.float32)


@dataclass
class _Decoded:
    source: PhotoSource
    image: DecodedImage | None
    error: PhotoError | None
    seconds: float


@dataclass
class _Pending:
    photo: AnalyzedPhoto
    chips: NDArray[np.uint8]


EMBED_AHEAD = 2
"""Batches of chips being embedded while the next photos are detected."""


@dataclass
class _Batch:
    """Photos whose chips are being embedded on the embedding thread."""

    entries: list[_Pending]
    vectors: Future[NDArray[np.float32]]

    @classmethod
    def start(
        cls,
        entries: list[_Pending],
        embedder: ArcFaceEmbedder,
        thread: ThreadPoolExecutor,
        timer: StageTimer,
    ) -> _Batch:
        chips = np.concatenate([p.chips for p in entries])

        def embed() -> NDArray[np.float32]:
            with timer.stage("embed"):
                return embedder.embed(chips)

        return cls(entries, thread.submit(embed))

    def done(self) -> bool:
        return self.vectors.done()

    def photos(self, keep_chips: bool) -> Iterator[AnalyzedPhoto]:
        """The batch's photos with their embeddings (waits for them; raises what embedding
        raised)."""
        vectors = self.vectors.result()
        offset = 0
        for entry in self.entries:
            count = len(entry.chips)
            entry.photo.embeddings = vectors[offset : offset + count]
            if keep_chips:
                entry.photo.chips = entry.chips
            offset += count
            yield entry.photo


class FacePipeline:
    """Detector and embedder loaded once; `analyze` streams photos through them."""

    def __init__(self, settings: PipelineSettings, *, fetch: RemoteFetcher | None = None) -> None:
        self.settings = settings
        self._fetch = fetch
        limit_image_threads()
        self._detector: FaceDetector | None = None
        self._embedder: ArcFaceEmbedder | None = None

    @property
    def detector(self) -> FaceDetector:
        """The face detector, loaded on first use."""
        if self._detector is None:
            self._detector = load_detector(self.settings, fetch=self._fetch)
        return self._detector

    @property
    def arcface(self) -> ArcFaceEmbedder:
        """The ArcFace embedder, loaded on first use."""
        if self._embedder is None:
            self._embedder = load_embedder(self.settings, fetch=self._fetch)
        return self._embedder

    @property
    def embedder(self) -> ModelInfo:
        """The embedder's model file (name and sha256 identify stored embeddings)."""
        return self.arcface.model

    @property
    def models(self) -> list[ModelInfo]:
        """Every model file in use: the detector's, then the embedder's."""
        return [*self.detector.models, self.embedder]

    def _decode(self, source: PhotoSource) -> _Decoded:
        start = time.perf_counter()
        try:
            data = source.read()
            image = decode_image(
                data,
                name=source.name,
                working_pixels=self.settings.working_pixels,
                max_image_pixels=self.settings.max_image_pixels,
                max_decoded_bytes=self.settings.max_decoded_bytes,
            )
            return _Decoded(source, image, None, time.perf_counter() - start)
        except PhotoError as exc:
            return _Decoded(source, None, exc, time.perf_counter() - start)

    def _decoded_in_order(
        self, photos: Iterable[PhotoSource], timer: StageTimer
    ) -> Generator[_Decoded]:
        """Each photo decoded, in order, up to `prefetch` ahead. Stopped early (a read that
        fails the job, or the caller closing it), it waits for the reads under way but starts
        none of the photos queued behind them."""
        window = max(1, self.settings.prefetch)
        pool = ThreadPoolExecutor(decode_threads(self.settings), "decode")
        try:
            queue: deque[Future[_Decoded]] = deque()
            for source in photos:
                queue.append(pool.submit(self._decode, source))
                if len(queue) >= window:
                    yield self._collect(queue.popleft(), timer)
            while queue:
                yield self._collect(queue.popleft(), timer)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _collect(future: Future[_Decoded], timer: StageTimer) -> _Decoded:
        decoded = future.result()
        timer.add("decode", decoded.seconds)
        return decoded

    def analyze(
        self,
        photos: Iterable[PhotoSource],
        *,
        face_thumbnails: bool = False,
        previews: bool = False,
        keep_chips: bool = False,
        timer: StageTimer | None = None,
    ) -> Iterator[AnalyzedPhoto]:
        """Decode, detect, align and embed each photo; results come out in input order.

        A photo that cannot be read or decoded, or that breaks a stage, comes out with its
        status and error instead of failing the album. A read that raises anything else (a
        storage outage the job must retry) is raised after every photo read before it has
        come out, so a caller that stores photos as they come loses only the unread ones.
        """
        timer = timer or StageTimer()
        detector, embedder = self.detector, self.arcface
        pending: list[_Pending] = []
        queued_chips = 0
        embedding: deque[_Batch] = deque()
        failure: Exception | None = None
        with (
            ThreadPoolExecutor(1, "embed") as embed_thread,
            closing(self._decoded_in_order(photos, timer)) as decoded_photos,
        ):
            count = 0
            while True:
                try:
                    decoded = next(decoded_photos)
                except StopIteration:
                    break
                except Exception as exc:  # finish the photos before it, then raise it
                    failure = exc
                    break
                count += 1
                entry = self._detect_and_align(decoded, detector, timer, face_thumbnails, previews)
                del decoded  # its pixels are cut into chips: free them before the next photo
                if count % TRIM_EVERY_PHOTOS == 0:
                    release_freed_memory()
                pending.append(entry)
                queued_chips += len(entry.chips)
                if queued_chips >= embedder.batch_size:
                    embedding.append(_Batch.start(pending, embedder, embed_thread, timer))
                    pending, queued_chips = [], 0
                # Photos leave in order, as soon as their batch is embedded; at most
                # EMBED_AHEAD batches wait (their chips are the memory this holds).
                while embedding and (len(embedding) > EMBED_AHEAD or embedding[0].done()):
                    yield from embedding.popleft().photos(keep_chips)
            if pending:
                embedding.append(_Batch.start(pending, embedder, embed_thread, timer))
            while embedding:
                yield from embedding.popleft().photos(keep_chips)
        if failure is not None:
            raise failure

    def _detect_and_align(
        self,
        decoded: _Decoded,
        detector: FaceDetector,
        timer: StageTimer,
        face_thumbnails: bool,
        previews: bool,
    ) -> _Pending:
        source, image = decoded.source, decoded.image
        size = self.arcface.chip_size
        no_chips = np.zeros((0, size, size, 3), np.uint8)
        if image is None:
            error = decoded.error
            status = error.status if error else PhotoStatus.ERROR
            reason = error.reason if error else "unknown error"
            logger.warning("photo skipped: %s: %s", source.name, reason)
            return _Pending(_failed(source, status, reason, self.arcface.dim), no_chips)
        try:
            with timer.stage("detect"):
                found = detect_photo(detector, image)
            with timer.stage("align"):
                chips = align_faces(image.pixels, found.landmarks, size)
                thumbs = _face_thumbnails(image.pixels, found) if face_thumbnails else []
                preview = (
                    encode_jpeg(image.pixels, max_side=PHOTO_PREVIEW_SIDE) if previews else None
                )
        except Exception as exc:  # one photo must never fail the album
            logger.exception("photo failed: %s", source.name)
            return _Pending(
                _failed(
                    source, PhotoStatus.ERROR, f"{type(exc).__name__}: {exc}", self.arcface.dim
                ),
                no_chips,
            )
        photo = AnalyzedPhoto(
            photo_id=source.id,
            name=source.name,
            status=PhotoStatus.OK,
            error=None,
            width=image.original_width,
            height=image.original_height,
            detections=found.scaled(1.0 / image.scale),
            embeddings=np.zeros((0, self.arcface.dim), np.float32),
            thumbnails=thumbs,
            preview=preview,
            working_scale=image.scale,
        )
        return _Pending(photo, chips)


def _failed(source: PhotoSource, status: PhotoStatus, reason: str, dim: int) -> AnalyzedPhoto:
    return AnalyzedPhoto(
        photo_id=source.id,
        name=source.name,
        status=status,
        error=reason,
        width=None,
        height=None,
        detections=Detections.empty(),
        embeddings=np.zeros((0, dim), np.float32),
    )


def _face_thumbnails(pixels: NDArray[np.uint8], found: Detections) -> list[bytes]:
    """A square JPEG around each face box, with some margin, for folders' cover faces."""
    height, width = pixels.shape[:2]
    thumbs = []
    for x1, y1, x2, y2 in found.boxes:
        side = max(x2 - x1, y2 - y1) * 1.4
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
        right, bottom = int(min(width, cx + side / 2)), int(min(height, cy + side / 2))
        crop = pixels[top:bottom, left:right]
        thumbs.append(encode_jpeg(np.ascontiguousarray(crop), max_side=FACE_THUMBNAIL_SIDE))
    return thumbs


def assemble_album(
    analyzed: list[AnalyzedPhoto],
    settings: PipelineSettings,
    *,
    models: list[ModelInfo],
    timer: StageTimer,
    embedder: str,
    dim: int,
) -> AlbumResult:
    """Group the faces of analysed photos and build the album's typed result; `dim` is the
    embedder's vector length (the album may have no face to tell it)."""
    faces: list[FaceResult] = []
    photo_index: list[int] = []
    for p_idx, photo in enumerate(analyzed):
        for i in range(len(photo.detections)):
            faces.append(
                FaceResult(
                    id=len(faces),
                    photo_id=photo.photo_id,
                    box=[round(float(v), 1) for v in photo.detections.boxes[i]],
                    landmarks=[
                        [round(float(v), 1) for v in pt] for pt in photo.detections.landmarks[i]
                    ],
                    score=round(float(photo.detections.scores[i]), 4),
                )
            )
            photo_index.append(p_idx)
    embeddings = (
        np.concatenate([p.embeddings for p in analyzed]).astype(np.float32)
        if faces
        else np.zeros((0, dim), np.float32)
    )
    small, tiny = album_small_faces(analyzed, settings.small_face)
    with timer.stage("group"):
        clustering = cluster_faces(
            embeddings,
            np.asarray(photo_index, np.int64),
            method=settings.grouping,
            threshold=settings.similarity_threshold,
            embedder=embedder,
            quality=np.asarray([f.score for f in faces], np.float32),
            min_quality=MIN_DETECTION_SCORE.get(settings.detector),
            small=small,
            tiny=tiny,
        )
        boxes = np.concatenate(
            [p.detections.boxes for p in analyzed] or [np.zeros((0, 4), np.float32)]
        )
        if settings.near_duplicates:
            clustering = follow_near_duplicates(
                clustering, embeddings, np.asarray(photo_index, np.int64), boxes, small
            )
    _apply_clustering(faces, clustering)
    covers = cover_faces(
        clustering.labels,
        np.concatenate([p.detections.scores for p in analyzed] or [np.zeros(0, np.float32)]),
        boxes,
    )
    groups = _person_groups(faces, covers)
    by_photo: dict[str, list[FaceResult]] = {}
    for face in faces:
        by_photo.setdefault(face.photo_id, []).append(face)
    photos = [_photo_result(photo, by_photo.get(photo.photo_id, [])) for photo in analyzed]
    return AlbumResult(
        photos=photos,
        faces=faces,
        embeddings=embeddings,
        groups=groups,
        group_idx_list=[g.idx for g in groups],
        models=models,
        settings=settings.model_dump(mode="json"),
        timings={k: round(v, 4) for k, v in timer.seconds.items()},
    )


def album_small_faces(
    analyzed: Sequence[AnalyzedPhoto], small_face: int
) -> tuple[NDArray[np.bool_] | None, NDArray[np.bool_] | None]:
    """`worker.rules.small_faces` of every face of the photos, in order (the result file's
    and the prototype API's grouping)."""
    sizes = [p.chip_sizes() for p in analyzed]
    return small_faces(np.concatenate(sizes or [np.zeros(0, np.float32)]), small_face)


def _apply_clustering(faces: list[FaceResult], clustering: Clustering) -> None:
    for face in faces:
        label = int(clustering.labels[face.id])
        face.group = label if label >= 0 else SINGLE_FACE_GROUP
        match = int(clustering.matched_face[face.id])
        if match >= 0:
            face.matched_face = match
            face.similarity = round(float(clustering.similarity[face.id]), 4)


def _person_groups(faces: list[FaceResult], covers: dict[int, int]) -> list[PersonGroup]:
    members: dict[int, list[int]] = {}
    for face in faces:
        if face.group >= 0:
            members.setdefault(face.group, []).append(face.id)
    groups = []
    for idx in sorted(members):
        ids = members[idx]
        photo_ids = list(dict.fromkeys(faces[i].photo_id for i in ids))
        groups.append(
            PersonGroup(idx=idx, face_ids=ids, photo_ids=photo_ids, cover_face_id=covers[idx])
        )
    return groups


def _photo_result(photo: AnalyzedPhoto, mine: list[FaceResult]) -> PhotoResult:
    group_idx = photo_groups(
        sorted({f.group for f in mine}), analysed=photo.status is PhotoStatus.OK
    )
    return PhotoResult(
        id=photo.photo_id,
        path=photo.name,
        status=photo.status,
        error=photo.error,
        width=photo.width,
        height=photo.height,
        face_ids=[f.id for f in mine],
        group_idx=group_idx,
    )


def group_album(
    photos: Iterable[PhotoSource],
    settings: PipelineSettings,
    *,
    pipeline: FacePipeline | None = None,
    on_progress: ProgressCallback | None = None,
    on_photo: Callable[[AnalyzedPhoto], None] | None = None,
    previews: bool = False,
) -> AlbumResult:
    """Find, embed and group every face of an album; one bad photo never fails it.

    `on_photo` sees each analysed photo as it streams by (e.g. to save thumbnails), so the
    caller need not keep pixels or thumbnails in memory.
    """
    pipeline = pipeline or FacePipeline(settings)
    sources = list(photos)
    timer = StageTimer()
    analyzed: list[AnalyzedPhoto] = []
    start = time.perf_counter()
    for done, photo in enumerate(
        pipeline.analyze(
            sources, face_thumbnails=on_photo is not None, previews=previews, timer=timer
        ),
        start=1,
    ):
        if on_photo is not None:
            on_photo(photo)
        photo.thumbnails, photo.preview = [], None
        analyzed.append(photo)
        if on_progress is not None:
            on_progress("analyze", done, len(sources))
    result = assemble_album(
        analyzed,
        settings,
        models=pipeline.models,
        timer=timer,
        embedder=pipeline.embedder.name,
        dim=pipeline.arcface.dim,
    )
    result.timings["total"] = round(time.perf_counter() - start, 4)
    if on_progress is not None:
        on_progress("group", 1, 1)
    return result
