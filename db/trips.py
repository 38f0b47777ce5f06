"""A trip's folders: what a regroup loads, and how its plan is saved.

`TripRows` reads everything a regroup decides on (faces, person folders, their stored
directions, analysed photos, links and the worker's records of them) and writes what was
decided (records of corrections, new folders, each face's group and folder, links, records of
the worker's links, deleted folders, directions), inside the transaction `db.common.trip_write`
opened. What to write is decided elsewhere (`worker.folders`, `worker.regroup`); the order of
the steps is `tasks/write.py`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Select, delete, func, insert, select, update
from sqlalchemy.orm import Session

from db.common import chunks, set_if_changed, trip_write
from db.models import Face, FolderCentroid, LinkRecord, PhotoAnalysis
from db.types import utcnow
from db.webapp import SHARED_TAG_IDS, Photo, PhotoTagFace, TagFace
from worker.types import Folder, FolderPlan, LinkState, NewFolder, TripFace
from worker.types import LinkRecord as LinkValue

logger = logging.getLogger(__name__)

UNNAMED = ""
"""custom_name of a folder the worker creates: Django's CharField(blank=True) is NOT NULL."""

LinkKey = tuple[int, int]


class TripRows:
    """One regroup's reads and writes of a trip (this embedder's faces), in an open
    transaction."""

    def __init__(
        self, session: Session, trip_id: int, embedder_sha256: str, job_id: int | None
    ) -> None:
        self.session = session
        self.trip_id = trip_id
        self.embedder_sha256 = embedder_sha256
        self.job_id = job_id
        self.now = utcnow()
        self._rows: list[Face] = []
        self._live_rows: list[Face] = []
        self._deleted: dict[int, datetime | None] = {}
        self._tags: dict[int, TagFace] = {}
        self._loaded = False

    # -- loads

    def stored_directions(self) -> dict[int, NDArray[np.float32]]:
        """Each person folder's direction as the last regroup stored it (aftertrip_folder)."""
        return {row.tagface_id: row.vector for row in self._centroid_rows()}

    def face_folders(self) -> tuple[list[NDArray[np.float32]], list[int | None]]:
        """Vectors and person folders of this embedder's faces of every photo of the trip
        (deleted ones too), as the rows hold them now: those `load` read, as the saves since
        changed them, once it has run."""
        faces = self._rows if self._loaded else self._faces()
        folders = [f.tagface_id if f.tagface_id not in SHARED_TAG_IDS else None for f in faces]
        return [f.vector for f in faces], folders

    def load(self) -> tuple[list[TripFace], list[Folder], set[int]]:
        """The faces of live photos (by photo id, face index; `folder`: their vote), the
        trip's person folders, and its live photos."""
        self._deleted = dict(
            self.session.execute(
                select(Photo.id, Photo.deleted_at).where(Photo.trip_id == self.trip_id)
            ).all()
        )
        self._rows = self._faces()
        self._loaded = True
        self._live_rows = [f for f in self._rows if self._deleted.get(f.photo_id) is None]
        self._tags = self._trip_tags()
        faces = [
            TripFace(
                photo_id=f.photo_id,
                embedding=f.vector,
                score=f.score,
                box=(f.x1, f.y1, f.x2, f.y2),
                chip_size=f.chip_size,
                folder=f.tagface_id if f.tagface_id in self._tags else None,
            )
            for f in self._live_rows
        ]
        folders = [Folder(t.id, t.tag_num, t.is_named) for t in self._tags.values()]
        live = {p for p, deleted in self._deleted.items() if deleted is None}
        return faces, folders, live

    def analysed_photos(self) -> list[int]:
        """Live photos with a successful analysis for this embedder (ordered by id)."""
        rows = self.session.scalars(
            select(PhotoAnalysis.photo_id)
            .join(Photo, Photo.id == PhotoAnalysis.photo_id)
            .where(
                Photo.trip_id == self.trip_id,
                Photo.deleted_at.is_(None),
                PhotoAnalysis.embedder_sha256 == self.embedder_sha256,
                PhotoAnalysis.analyzed_at.is_not(None),
            )
            .order_by(PhotoAnalysis.photo_id)
        )
        return list(rows)

    def records(self) -> dict[LinkKey, LinkValue]:
        """The worker's records of the trip's links (aftertrip_link), by link."""
        rows = self.session.scalars(
            select(LinkRecord).where(LinkRecord.trip_id == self.trip_id).order_by(LinkRecord.id)
        )
        return {
            (r.photo_id, r.tagface_id): LinkValue(
                r.id, r.photo_id, r.tagface_id, LinkState(r.state)
            )
            for r in rows
        }

    def links(self) -> dict[LinkKey, int]:
        """The trip's photos_photo_tag_face rows: link -> row id."""
        rows = self.session.execute(
            select(PhotoTagFace.id, PhotoTagFace.photo_id, PhotoTagFace.tagface_id).where(
                PhotoTagFace.photo_id.in_(self._trip_photo_ids())
            )
        )
        return {(photo_id, tag_id): link_id for link_id, photo_id, tag_id in rows}

    # -- saves

    def record_corrections(
        self, replaced: Sequence[int], rows: Sequence[tuple[LinkKey, LinkState]]
    ) -> None:
        """Replace the records of corrected links by corrections, inserted in `rows`' order
        (their new ids order them)."""
        for ids in chunks(sorted(replaced)):
            self.session.execute(delete(LinkRecord).where(LinkRecord.id.in_(ids)))
        for (photo_id, tag_id), state in rows:
            self.session.execute(
                insert(LinkRecord).values(
                    trip_id=self.trip_id,
                    photo_id=photo_id,
                    tagface_id=tag_id,
                    state=state.value,
                    job_id=self.job_id,
                    noticed_at=self.now,
                )
            )

    def create_folders(self, new_folders: list[NewFolder]) -> dict[int, int]:
        """Create the plan's new folders; returns plan key -> new folder id."""
        ids: dict[int, int] = {}
        for new in new_folders:
            tag = TagFace(tag_num=new.tag_num, custom_name=UNNAMED)
            self.session.add(tag)
            self.session.flush()
            ids[new.key] = tag.id
        return ids

    def update_faces(self, plan: FolderPlan, ids: Mapping[int, int]) -> None:
        """Each live face's group, match, folder and cover, from the plan (same order as
        `load`'s faces); faces of deleted photos keep their folder (it remembers the person)
        but never stand for it."""
        faces = self._live_rows
        for i, face in enumerate(faces):
            match = int(plan.matched[i])
            sim = float(plan.similarity[i])
            set_if_changed(face, "group_label", int(plan.labels[i]))
            set_if_changed(face, "tagface_id", ids.get(plan.folders[i], plan.folders[i]))
            set_if_changed(face, "matched_face_id", faces[match].id if match >= 0 else None)
            set_if_changed(face, "similarity", sim if np.isfinite(sim) else None)
            set_if_changed(face, "is_cover", plan.covers[i])
        for face in self._rows:
            if self._deleted.get(face.photo_id) is not None and face.is_cover:
                face.is_cover = False
        self.session.flush()

    def replace_links(self, desired: set[LinkKey]) -> tuple[int, int]:
        """Make the trip's photos_photo_tag_face rows exactly `desired`; returns (added,
        removed). Only rows that must go are deleted and only missing ones inserted, so
        unchanged links keep their ids."""
        existing = self.links()
        stale = sorted(link_id for key, link_id in existing.items() if key not in desired)
        for ids in chunks(stale):
            self.session.execute(delete(PhotoTagFace).where(PhotoTagFace.id.in_(ids)))
        missing = sorted(desired - existing.keys())
        for pairs in chunks(missing):
            self.session.execute(
                insert(PhotoTagFace), [{"photo_id": p, "tagface_id": t} for p, t in pairs]
            )
        return len(missing), len(stale)

    def record_links(self, drop: Sequence[int], new: Sequence[LinkKey]) -> None:
        """Delete the records `drop`; record the links `new` as the worker's."""
        for ids in chunks(sorted(drop)):
            self.session.execute(delete(LinkRecord).where(LinkRecord.id.in_(ids)))
        for pairs in chunks(list(new)):
            self.session.execute(
                insert(LinkRecord),
                [
                    {
                        "trip_id": self.trip_id,
                        "photo_id": photo_id,
                        "tagface_id": tag_id,
                        "state": LinkState.WORKER.value,
                        "job_id": self.job_id,
                        "noticed_at": self.now,
                    }
                    for photo_id, tag_id in pairs
                ],
            )

    def delete_folders(self, candidates: Sequence[int]) -> set[int]:
        """Delete the candidate folders no photo links to any more; returns their ids."""
        if not candidates:
            return set()
        still_linked = set(
            self.session.scalars(
                select(PhotoTagFace.tagface_id).where(PhotoTagFace.tagface_id.in_(candidates))
            )
        )
        doomed = [t for t in candidates if t not in still_linked]
        if not doomed:
            return set()
        # The foreign key would set these NULL too; doing it here keeps the session in step.
        self.session.execute(
            update(Face).where(Face.tagface_id.in_(doomed)).values(tagface_id=None)
        )
        for face in self._rows:
            if face.tagface_id in doomed:
                face.tagface_id = None
        self.session.execute(delete(TagFace).where(TagFace.id.in_(doomed)))
        logger.info("empty folders deleted", extra={"trip_id": self.trip_id, "tag_ids": doomed})
        return set(doomed)

    def save_directions(
        self, vectors: Mapping[int, NDArray[np.float32]], counts: Mapping[int, int]
    ) -> None:
        """Remember each person folder's direction and face count for the next regroup
        (aftertrip_folder); folders without one lose their row."""
        rows: dict[int, FolderCentroid] = {row.tagface_id: row for row in self._centroid_rows()}
        for tag_id, stale in rows.items():
            if tag_id not in vectors:
                self.session.delete(stale)
        for tag_id in sorted(vectors):
            data = vectors[tag_id].astype("<f4").tobytes()
            row = rows.get(tag_id)
            if row is None:
                row = FolderCentroid(
                    tagface_id=tag_id, embedder_sha256=self.embedder_sha256, trip_id=self.trip_id
                )
                self.session.add(row)
            if row.centroid != data or row.face_count != counts.get(tag_id, 0):
                row.centroid = data
                row.face_count = counts.get(tag_id, 0)
                row.updated_at = self.now

    # -- helpers

    def _faces(self) -> list[Face]:
        return list(
            self.session.scalars(
                select(Face)
                .where(
                    Face.photo_id.in_(self._trip_photo_ids()),
                    Face.embedder_sha256 == self.embedder_sha256,
                )
                .order_by(Face.photo_id, Face.face_index)
            )
        )

    def _centroid_rows(self) -> list[FolderCentroid]:
        return list(
            self.session.scalars(
                select(FolderCentroid).where(
                    FolderCentroid.trip_id == self.trip_id,
                    FolderCentroid.embedder_sha256 == self.embedder_sha256,
                )
            )
        )

    def _trip_photo_ids(self) -> Select[int]:
        return select(Photo.id).where(Photo.trip_id == self.trip_id)

    def _trip_tags(self) -> dict[int, TagFace]:
        """The trip's person folders: linked to its photos or holding its faces (any embedder)."""
        linked = select(PhotoTagFace.tagface_id).where(
            PhotoTagFace.photo_id.in_(self._trip_photo_ids())
        )
        held = select(Face.tagface_id).where(
            Face.photo_id.in_(self._trip_photo_ids()), Face.tagface_id.is_not(None)
        )
        corrected = select(LinkRecord.tagface_id).where(LinkRecord.trip_id == self.trip_id)
        ids = set(self.session.scalars(linked)) | set(self.session.scalars(held))
        ids |= set(self.session.scalars(corrected))
        ids -= SHARED_TAG_IDS
        if not ids:
            return {}
        tags = self.session.scalars(
            select(TagFace).where(TagFace.id.in_(sorted(ids))).order_by(TagFace.id)
        )
        return {tag.id: tag for tag in tags}


def forget_corrections(*, session: Session, trip_id: int) -> int:
    """Forget every correction of a trip, and commit; returns how many were in force.

    The worker's record of its own links goes too, so the next job notices nothing and
    writes the worker's own grouping over what people changed. The session must have no
    transaction open.
    """
    with trip_write(session, trip_id, "forget_corrections", check_shared=False):
        forgotten = (
            session.scalar(
                select(func.count())
                .select_from(LinkRecord)
                .where(
                    LinkRecord.trip_id == trip_id,
                    LinkRecord.state.in_([LinkState.ADDED.value, LinkState.REMOVED.value]),
                )
            )
            or 0
        )
        session.execute(delete(LinkRecord).where(LinkRecord.trip_id == trip_id))
    logger.info("corrections forgotten", extra={"trip_id": trip_id, "corrections": forgotten})
    return forgotten
