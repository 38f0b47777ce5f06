"""A trip scenario for the database tests: random people in 512-d, their faces in photos,
and readers of what a trip write leaves in the web app's tables."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db.models import Face, PhotoAnalysis
from db.schemas import PhotoOutcome
from db.webapp import Photo, PhotoTagFace, TagFace
from tasks.write import write_trip_result
from tests.plugins.databases import add_photos, add_trip
from worker.settings import PipelineSettings
from worker.types import FoundFace, ModelInfo

DIM = 512
EMBEDDER = ModelInfo(
    name="w600k_mbf", role="embedder", path="/models/w600k_mbf.onnx", sha256="e" * 64
)
DETECTOR = ModelInfo(
    name="scrfd_500m_bnkps", role="detector", path="/models/scrfd.onnx", sha256="d" * 64
)
SETTINGS = PipelineSettings(grouping="default", similarity_threshold=None)


def unit_vector(v: np.ndarray) -> np.ndarray:
    """`v` scaled to length 1, as float32."""
    return (v / np.linalg.norm(v)).astype(np.float32)


@dataclass
class People:
    """Random identities in 512-d (nearly orthogonal) and noisy faces of them."""

    seed: int = 0
    bases: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def face(self, who: str, noise: float = 0.5) -> np.ndarray:
        """An L2-normalised embedding of `who`: cosine ~0.8 to other faces of them, ~0 else."""
        if who not in self.bases:
            self.bases[who] = unit_vector(self.rng.standard_normal(DIM))
        return unit_vector(self.bases[who] + noise * unit_vector(self.rng.standard_normal(DIM)))


def face_outcome(people: People, who: str, slot: int, shift: float = 0.0) -> FoundFace:
    """A face of `who` at position `slot` (left to right) of a photo, moved by `shift` px."""
    x = 100.0 * slot + shift
    box = (x, 50.0 + shift, x + 80.0, 150.0 + shift)
    landmarks = ((x + 20, 80.0), (x + 60, 80.0), (x + 40, 100.0), (x + 25, 125.0), (x + 55, 125.0))
    return FoundFace(
        box=box, landmarks=landmarks, score=0.9 + 0.01 * slot, embedding=people.face(who)
    )


def photo_outcome(photo_id: int, faces: list[FoundFace]) -> PhotoOutcome:
    """An analysed 1000x800 photo with these faces."""
    return PhotoOutcome(
        photo_id=photo_id, status="ok", error=None, width=1000, height=800, faces=faces
    )


# Who is in each of the trip's first photos: A, B and C are people seen several times,
# D and E are faces seen once, photo 4 has no face.
CAST: list[list[str]] = [["A", "B"], ["A", "C"], ["B", "C"], ["A"], [], ["D"], ["B", "E"]]


def cast_outcomes(people: People, photo_ids: list[int], cast: list[list[str]], shift: float = 0.0):
    """Each photo's outcome, its faces those of `cast` (names per photo)."""
    return [
        photo_outcome(
            pid, [face_outcome(people, who, slot, shift) for slot, who in enumerate(names)]
        )
        for pid, names in zip(photo_ids, cast, strict=True)
    ]


def add_cast_trip(engine: Engine, count: int = len(CAST)) -> tuple[int, list[int]]:
    """A new trip with `count` photos: (trip id, photo ids)."""
    with Session(engine) as session, session.begin():
        trip = add_trip(session)
        photos = add_photos(session, trip.id, count)
        return trip.id, [p.id for p in photos]


def write_result(engine: Engine, trip_id: int, outcomes: list[PhotoOutcome], **kwargs):
    """`tasks.write.write_trip_result` of these outcomes, with the scenario's embedder and
    settings."""
    with Session(engine) as session:
        return write_trip_result(
            session=session,
            trip_id=trip_id,
            analyzed=outcomes,
            embedder=EMBEDDER,
            settings=SETTINGS,
            **kwargs,
        )


def folder_links(engine: Engine, trip_id: int) -> dict[int, set[int]]:
    """photo id -> folder ids, for the trip's photos."""
    with Session(engine) as session:
        rows = session.execute(
            select(PhotoTagFace.photo_id, PhotoTagFace.tagface_id)
            .join(Photo, Photo.id == PhotoTagFace.photo_id)
            .where(Photo.trip_id == trip_id)
        ).all()
    out: dict[int, set[int]] = {}
    for photo_id, tag_id in rows:
        out.setdefault(photo_id, set()).add(tag_id)
    return out


def snapshot_rows(engine: Engine) -> dict[str, list[tuple]]:
    """Every row the write touches, in a comparable form."""
    with Session(engine) as session:
        return {
            "links": sorted(
                session.execute(
                    select(PhotoTagFace.id, PhotoTagFace.photo_id, PhotoTagFace.tagface_id)
                )
            ),
            "tags": sorted(
                session.execute(select(TagFace.id, TagFace.tag_num, TagFace.custom_name))
            ),
            "faces": sorted(
                session.execute(
                    select(
                        Face.id,
                        Face.photo_id,
                        Face.face_index,
                        Face.tagface_id,
                        Face.group_label,
                        Face.matched_face_id,
                        Face.similarity,
                        Face.is_cover,
                        Face.x1,
                        Face.y1,
                        Face.embedding,
                    )
                )
            ),
            "analyses": sorted(
                session.execute(
                    select(
                        PhotoAnalysis.photo_id,
                        PhotoAnalysis.status,
                        PhotoAnalysis.error,
                        PhotoAnalysis.face_count,
                        PhotoAnalysis.analyzed_at,
                    )
                )
            ),
        }
