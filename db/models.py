"""The worker's own tables (prefix `aftertrip_`), created by the migrations in db/migrations.

- `aftertrip_job`: one grouping run of a trip (a Celery task, possibly delivered twice);
- `aftertrip_photo`: what happened to one photo for one embedder (ok, or its error);
- `aftertrip_face`: every face found, with its embedding and the folder it went to;
- `aftertrip_folder`: each person folder's direction as the last regroup left it;
- `aftertrip_link`: the links the worker wrote, and the corrections people made to them;
- `aftertrip_request`: the web app's requests to group a trip, until a job has carried them out.

Foreign keys into the web app's tables cascade (or set NULL) in the database, because the
web app deletes in Python and does not know these tables exist.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.types import BigId, UTCDateTime, utcnow
from db.webapp import Photo, TagFace, Trip

# Explicit names keep every index and constraint under MySQL's 64-character limit and
# identical on the three backends (Alembic can then drop them by name).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}

SHA256_LENGTH = 64

# Ids are never reused on SQLite either (as on the servers, and like Django's tables): a
# deleted face's id must not come back as another face.
_SQLITE_AUTOINCREMENT = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    """Declarative base of the worker's tables (the only MetaData Alembic manages)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(StrEnum):
    """Where a grouping job is."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"  # failed with an error that may pass; Celery runs it again
    SKIPPED = "skipped"  # ended early without writing (the trip was deleted in the web app)


class JobMode(StrEnum):
    """Which photos a job analyses: only those without a result, or all of them again."""

    MISSING = "missing"
    ALL = "all"


class Job(Base):
    """aftertrip_job: one grouping run of a trip and the models it used."""

    __tablename__ = "aftertrip_job"
    __table_args__ = (Index(None, "trip_id", "status"), _SQLITE_AUTOINCREMENT)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trip_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(Trip.id, ondelete="CASCADE"), nullable=False
    )
    mode: Mapped[str] = mapped_column(String(16), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=JobStatus.QUEUED)
    celery_task_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Renewed every few seconds while a worker runs the job (migration 0003): a `running`
    # row whose heartbeat is old has lost its worker or its database connection.
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    detector_name: Mapped[str | None] = mapped_column(String(255))
    detector_sha256: Mapped[str | None] = mapped_column(String(SHA256_LENGTH))
    embedder_name: Mapped[str | None] = mapped_column(String(255))
    embedder_sha256: Mapped[str | None] = mapped_column(String(SHA256_LENGTH))
    # Every model file (name, role, sha256): MTCNN alone is three files.
    models: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    # Where the running job is (migration 0005), written best-effort while it runs: the
    # stage ("models", "analyze", "group") and the steps done of its total.
    stage: Mapped[str | None] = mapped_column(String(16))
    progress_done: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)


class TripRequest(Base):
    """aftertrip_request: "group this trip", as the web app asked (`aftertrip_client`).

    Written by the client in the app's own transaction; `claimed_by` is the task id of the
    job that took it (every open request of a trip is taken at once: one job carries out a
    burst); the job deletes what it took when it ends. Unclaimed rows are pending.
    """

    __tablename__ = "aftertrip_request"
    __table_args__ = (_SQLITE_AUTOINCREMENT,)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trip_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(Trip.id, ondelete="CASCADE"), nullable=False, index=True
    )
    mode: Mapped[str] = mapped_column(String(16), nullable=False)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(255), index=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PhotoAnalysis(Base):
    """aftertrip_photo: the latest analysis of one photo with one embedder.

    `analyzed_at` is the time of the last *successful* analysis: a later failure records
    its status and error here but keeps the faces (and sizes) that analysis stored.
    """

    __tablename__ = "aftertrip_photo"
    __table_args__ = (UniqueConstraint("photo_id", "embedder_sha256"), _SQLITE_AUTOINCREMENT)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    photo_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(Photo.id, ondelete="CASCADE"), nullable=False
    )
    embedder_name: Mapped[str] = mapped_column(String(255), nullable=False)
    embedder_sha256: Mapped[str] = mapped_column(String(SHA256_LENGTH), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    face_count: Mapped[int | None] = mapped_column(Integer)
    analyzed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    job_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("aftertrip_job.id", ondelete="SET NULL"), index=True
    )


class Face(Base):
    """aftertrip_face: one detected face, its embedding, and the person folder it went to.

    Unique per (photo, embedder, face_index), so a redelivered job rewrites the same rows
    instead of adding copies.
    """

    __tablename__ = "aftertrip_face"
    __table_args__ = (
        UniqueConstraint("photo_id", "embedder_sha256", "face_index"),
        _SQLITE_AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    photo_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(Photo.id, ondelete="CASCADE"), nullable=False
    )
    face_index: Mapped[int] = mapped_column(Integer, nullable=False)
    x1: Mapped[float] = mapped_column(Float, nullable=False)
    y1: Mapped[float] = mapped_column(Float, nullable=False)
    x2: Mapped[float] = mapped_column(Float, nullable=False)
    y2: Mapped[float] = mapped_column(Float, nullable=False)
    landmarks: Mapped[list[list[float]]] = mapped_column(JSON, nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    # float32 little-endian bytes (2 KiB for 512-d); read with `Face.vector`.
    embedding: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    embedder_name: Mapped[str] = mapped_column(String(255), nullable=False)
    embedder_sha256: Mapped[str] = mapped_column(String(SHA256_LENGTH), nullable=False)
    tagface_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey(TagFace.id, ondelete="SET NULL"), index=True
    )
    group_label: Mapped[int | None] = mapped_column(Integer)
    matched_face_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("aftertrip_face.id", ondelete="SET NULL"), index=True
    )
    similarity: Mapped[float | None] = mapped_column(Float)
    is_cover: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    thumbnail_key: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    # Size in the pixels the chip was cut from (`FoundFace.chip_size`); NULL for faces stored
    # before it was kept, which the grouping treats as not small.
    chip_size: Mapped[float | None] = mapped_column(Float)

    @property
    def box(self) -> list[float]:
        """x1, y1, x2, y2 in original photo pixels."""
        return [self.x1, self.y1, self.x2, self.y2]

    @property
    def vector(self) -> NDArray[np.float32]:
        """The stored embedding as a float32 vector."""
        return np.frombuffer(self.embedding, dtype="<f4").astype(np.float32)


class FolderCentroid(Base):
    """aftertrip_folder: each person folder's mean embedding direction, as the last regroup
    left it (one row per folder and embedder).

    A regroup matches groups nobody voted for to folders by these directions. They are kept
    apart from the face rows because storing a batch rewrites face rows in place: a photo
    re-analysed between two regroups would otherwise take its old vector, and with it the
    folder's memory of that person, with it.
    """

    __tablename__ = "aftertrip_folder"
    __table_args__ = (Index(None, "trip_id", "embedder_sha256"),)

    tagface_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(TagFace.id, ondelete="CASCADE"), primary_key=True
    )
    embedder_sha256: Mapped[str] = mapped_column(String(SHA256_LENGTH), primary_key=True)
    trip_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(Trip.id, ondelete="CASCADE"), nullable=False
    )
    # float32 little-endian bytes of the unit mean direction, as `Face.embedding`.
    centroid: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    face_count: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    @property
    def vector(self) -> NDArray[np.float32]:
        """The stored direction as a float32 vector."""
        return np.frombuffer(self.centroid, dtype="<f4").astype(np.float32)


class LinkRecord(Base):
    """aftertrip_link: a photos_photo_tag_face link as the worker last left it.

    `worker` rows are the links the last regroup wrote. The next regroup compares them with
    the links there are: one of them gone (its photo not deleted) was removed by a person,
    and a person folder's link it did not write was added by one. Such corrections stay
    here as `added` / `removed` rows while the photo and the folder exist (the foreign keys
    cascade). `id` orders them: a correction noticed later has a higher id (the latest wins);
    `job_id` is the job that noticed it (or wrote the link).
    """

    __tablename__ = "aftertrip_link"
    __table_args__ = (
        UniqueConstraint("photo_id", "tagface_id"),
        Index(None, "trip_id", "state"),
        _SQLITE_AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    trip_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(Trip.id, ondelete="CASCADE"), nullable=False
    )
    photo_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(Photo.id, ondelete="CASCADE"), nullable=False
    )
    tagface_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(TagFace.id, ondelete="CASCADE"), nullable=False, index=True
    )
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    job_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("aftertrip_job.id", ondelete="SET NULL"), index=True
    )
    noticed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
