"""The web app's tables, mapped exactly as its Django migrations create them.

The web app (Django) owns these tables: the worker reads trips and photos, and writes only
`photos_tagface` (person folders) and `photos_photo_tag_face` (which photo is in which
folder). They live in their own `MetaData`, apart from the worker's `Base`, so Alembic never
creates, alters or drops them.

Column choices, checked against what Django stores on each backend:
- `file_key` is a Django `UUIDField`: native `uuid` on PostgreSQL, `char(32)` (hex without
  dashes) on MySQL/MariaDB and SQLite. `DjangoUUID` maps both, and reads a native MariaDB
  `uuid` column (Django >= 5.0 on MariaDB >= 10.7) too. The S3 object key is
  `str(file_key)`: the canonical lowercase form *with* dashes, the way Django's
  `str(instance.file_key)` (and `uuid.uuid4()` in the upload code) spells it, whatever the
  database stores. `Photo.s3_key` is that string.
- `photos_tagface.custom_name` is a `CharField(blank=True)`: NOT NULL in the database, with
  '' meaning "unnamed"; NULL is read as unnamed too, in case a deployment made it nullable.
- `group_id` (bigint) and `uploaded_by_id` (`varchar(25)`: the app's user ids are strings)
  point at account tables the worker never touches, so no foreign keys to them are declared
  here.
- Django emulates `on_delete=CASCADE` in Python: its foreign keys carry no ON DELETE clause
  (and are DEFERRABLE INITIALLY DEFERRED on PostgreSQL and SQLite).
"""

from __future__ import annotations

import logging
import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from db.types import BigId, DjangoUUID, UTCDateTime, engine_time_zone, utcnow
from worker.errors import AfterTripError
from worker.types import SharedFolders

logger = logging.getLogger(__name__)

NO_FACE_TAG_ID = 1
"""photos_tagface row shared by all trips: photos in which no face was found (tag_num -2)."""

OTHERS_TAG_ID = 2
"""photos_tagface row shared by all trips: photos whose faces were each seen once (tag_num -1)."""

SHARED_TAG_IDS = frozenset({NO_FACE_TAG_ID, OTHERS_TAG_ID})
SHARED_FOLDER_IDS = SharedFolders(no_face=NO_FACE_TAG_ID, others=OTHERS_TAG_ID)
"""The shared folders' ids, as the folder plan takes them."""


class WebAppBase(DeclarativeBase):
    """Declarative base of the web app's tables; its MetaData is never given to Alembic."""

    metadata = MetaData()


class Trip(WebAppBase):
    """trips_trip: one trip of a travel group."""

    __tablename__ = "trips_trip"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    group_id: Mapped[int] = mapped_column(BigInteger)
    place: Mapped[str] = mapped_column(String(50))
    departing_date: Mapped[date] = mapped_column(Date, default=date.today)
    arriving_date: Mapped[date] = mapped_column(Date, default=date.today)
    thumbnail: Mapped[str | None] = mapped_column(Text)


class Photo(WebAppBase):
    """photos_photo: one uploaded photo; its bytes are the S3 object `s3_key`."""

    __tablename__ = "photos_photo"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    file_key: Mapped[uuid.UUID | str] = mapped_column(DjangoUUID, unique=True, default=uuid.uuid4)
    file_name: Mapped[str] = mapped_column(String(255), default="")
    trip_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("trips_trip.id"), index=True)
    url: Mapped[str] = mapped_column(Text, default="")
    taken_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    uploaded_by_id: Mapped[str | None] = mapped_column(String(25))
    is_sorted_yolo: Mapped[bool] = mapped_column(Boolean, default=False)

    @property
    def key_error(self) -> str | None:
        """Why `file_key` cannot name an S3 object (it is not a UUID), None when it can."""
        if isinstance(self.file_key, uuid.UUID):
            return None
        return (
            f"file_key {str(self.file_key)[:40]!r} is not a UUID: the web app stores every "
            "photo under a UUID; fix or delete this row (the photo was not read)"
        )

    @property
    def s3_key(self) -> str:
        """The S3 object key of the photo: `str(file_key)`, lowercase with dashes.

        Raises `InvalidFileKey` when the row's file_key is not a UUID: such text never
        becomes an object key (see `key_error`)."""
        if self.key_error is not None:
            raise InvalidFileKey(f"photo {self.id}: {self.key_error}")
        return str(self.file_key)


class TagFace(WebAppBase):
    """photos_tagface: one person folder; `custom_name` is what users typed ('' = unnamed)."""

    __tablename__ = "photos_tagface"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tag_num: Mapped[int] = mapped_column(Integer)
    custom_name: Mapped[str | None] = mapped_column(String(255), default="")

    @property
    def is_named(self) -> bool:
        """Whether a user gave the folder a name (named folders are never deleted)."""
        return bool(self.custom_name and self.custom_name.strip())


class PhotoTagFace(WebAppBase):
    """photos_photo_tag_face: Django's many-to-many table between photos and person folders."""

    __tablename__ = "photos_photo_tag_face"
    __table_args__ = (UniqueConstraint("photo_id", "tagface_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    photo_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("photos_photo.id"), index=True)
    tagface_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("photos_tagface.id"), index=True)


# The four tables as the AfterTrip backend's own migrations create them (Django 3.2; the same
# columns, types, order and constraint names as ../shared/webapp-schema/*.sql), minus the
# foreign keys to its account tables, which this copy does not create. Kept as SQL rather
# than built from the mappings above so that tests check the mappings against the app's
# layout, not against themselves.
_PG_DDL: dict[str, list[str]] = {
    "trips_trip": [
        'CREATE TABLE "trips_trip" ("id" bigserial NOT NULL PRIMARY KEY, "created_at" timestamp '
        'with time zone NOT NULL, "updated_at" timestamp with time zone NOT NULL, "deleted_at" '
        'timestamp with time zone NULL, "place" varchar(50) NOT NULL, "departing_date" date NOT '
        'NULL, "arriving_date" date NOT NULL, "thumbnail" text NULL, "group_id" bigint NOT NULL)',
        'CREATE INDEX "trips_trip_group_id_fa9a4904" ON "trips_trip" ("group_id")',
    ],
    "photos_tagface": [
        'CREATE TABLE "photos_tagface" ("id" bigserial NOT NULL PRIMARY KEY, "tag_num" integer '
        'NOT NULL, "custom_name" varchar(255) NOT NULL)',
    ],
    "photos_photo": [
        'CREATE TABLE "photos_photo" ("id" bigserial NOT NULL PRIMARY KEY, "created_at" '
        'timestamp with time zone NOT NULL, "updated_at" timestamp with time zone NOT NULL, '
        '"deleted_at" timestamp with time zone NULL, "file_key" uuid NOT NULL UNIQUE, '
        '"file_name" varchar(255) NOT NULL, "url" text NOT NULL, "taken_at" timestamp with '
        'time zone NULL, "is_sorted_yolo" boolean NOT NULL, "trip_id" bigint NOT NULL, '
        '"uploaded_by_id" varchar(25) NULL)',
        'ALTER TABLE "photos_photo" ADD CONSTRAINT "photos_photo_trip_id_787b2fd2_fk_trips_trip_id"'
        ' FOREIGN KEY ("trip_id") REFERENCES "trips_trip" ("id") DEFERRABLE INITIALLY DEFERRED',
        'CREATE INDEX "photos_photo_trip_id_787b2fd2" ON "photos_photo" ("trip_id")',
        'CREATE INDEX "photos_photo_uploaded_by_id_733c230f" ON "photos_photo" ("uploaded_by_id")',
    ],
    "photos_photo_tag_face": [
        'CREATE TABLE "photos_photo_tag_face" ("id" bigserial NOT NULL PRIMARY KEY, "photo_id" '
        'bigint NOT NULL, "tagface_id" bigint NOT NULL)',
        'ALTER TABLE "photos_photo_tag_face" ADD CONSTRAINT '
        '"photos_photo_tag_face_photo_id_tagface_id_109424bd_uniq" '
        'UNIQUE ("photo_id", "tagface_id")',
        'ALTER TABLE "photos_photo_tag_face" ADD CONSTRAINT '
        '"photos_photo_tag_face_photo_id_8663f98c_fk_photos_photo_id" FOREIGN KEY ("photo_id") '
        'REFERENCES "photos_photo" ("id") DEFERRABLE INITIALLY DEFERRED',
        'ALTER TABLE "photos_photo_tag_face" ADD CONSTRAINT '
        '"photos_photo_tag_face_tagface_id_a56309b6_fk_photos_tagface_id" FOREIGN KEY '
        '("tagface_id") REFERENCES "photos_tagface" ("id") DEFERRABLE INITIALLY DEFERRED',
        'CREATE INDEX "photos_photo_tag_face_photo_id_8663f98c" ON "photos_photo_tag_face" '
        '("photo_id")',
        'CREATE INDEX "photos_photo_tag_face_tagface_id_a56309b6" ON "photos_photo_tag_face" '
        '("tagface_id")',
    ],
}

_MYSQL_DDL: dict[str, list[str]] = {
    "trips_trip": [
        "CREATE TABLE `trips_trip` (`id` bigint AUTO_INCREMENT NOT NULL PRIMARY KEY, "
        "`created_at` datetime(6) NOT NULL, `updated_at` datetime(6) NOT NULL, `deleted_at` "
        "datetime(6) NULL, `place` varchar(50) NOT NULL, `departing_date` date NOT NULL, "
        "`arriving_date` date NOT NULL, `thumbnail` longtext NULL, `group_id` bigint NOT NULL, "
        "KEY `trips_trip_group_id_fa9a4904_fk_accounts_group_id` (`group_id`))",
    ],
    "photos_tagface": [
        "CREATE TABLE `photos_tagface` (`id` bigint AUTO_INCREMENT NOT NULL PRIMARY KEY, "
        "`tag_num` integer NOT NULL, `custom_name` varchar(255) NOT NULL)",
    ],
    "photos_photo": [
        "CREATE TABLE `photos_photo` (`id` bigint AUTO_INCREMENT NOT NULL PRIMARY KEY, "
        "`created_at` datetime(6) NOT NULL, `updated_at` datetime(6) NOT NULL, `deleted_at` "
        "datetime(6) NULL, `file_key` char(32) NOT NULL UNIQUE, `file_name` varchar(255) NOT "
        "NULL, `url` longtext NOT NULL, `taken_at` datetime(6) NULL, `is_sorted_yolo` bool NOT "
        "NULL, `trip_id` bigint NOT NULL, `uploaded_by_id` varchar(25) NULL, "
        "KEY `photos_photo_uploaded_by_id_733c230f_fk_accounts_user_id` (`uploaded_by_id`))",
        "ALTER TABLE `photos_photo` ADD CONSTRAINT `photos_photo_trip_id_787b2fd2_fk_trips_trip_id`"
        " FOREIGN KEY (`trip_id`) REFERENCES `trips_trip` (`id`)",
    ],
    "photos_photo_tag_face": [
        "CREATE TABLE `photos_photo_tag_face` (`id` bigint AUTO_INCREMENT NOT NULL PRIMARY KEY, "
        "`photo_id` bigint NOT NULL, `tagface_id` bigint NOT NULL)",
        "ALTER TABLE `photos_photo_tag_face` ADD CONSTRAINT "
        "`photos_photo_tag_face_photo_id_tagface_id_109424bd_uniq` "
        "UNIQUE (`photo_id`, `tagface_id`)",
        "ALTER TABLE `photos_photo_tag_face` ADD CONSTRAINT "
        "`photos_photo_tag_face_photo_id_8663f98c_fk_photos_photo_id` FOREIGN KEY (`photo_id`) "
        "REFERENCES `photos_photo` (`id`)",
        "ALTER TABLE `photos_photo_tag_face` ADD CONSTRAINT "
        "`photos_photo_tag_face_tagface_id_a56309b6_fk_photos_tagface_id` FOREIGN KEY "
        "(`tagface_id`) REFERENCES `photos_tagface` (`id`)",
    ],
}

_SQLITE_DDL: dict[str, list[str]] = {
    "trips_trip": [
        'CREATE TABLE "trips_trip" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
        '"created_at" datetime NOT NULL, "updated_at" datetime NOT NULL, "deleted_at" datetime '
        'NULL, "place" varchar(50) NOT NULL, "departing_date" date NOT NULL, "arriving_date" '
        'date NOT NULL, "thumbnail" text NULL, "group_id" bigint NOT NULL)',
        'CREATE INDEX "trips_trip_group_id_fa9a4904" ON "trips_trip" ("group_id")',
    ],
    "photos_tagface": [
        'CREATE TABLE "photos_tagface" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
        '"tag_num" integer NOT NULL, "custom_name" varchar(255) NOT NULL)',
    ],
    "photos_photo": [
        'CREATE TABLE "photos_photo" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
        '"created_at" datetime NOT NULL, "updated_at" datetime NOT NULL, "deleted_at" datetime '
        'NULL, "file_key" char(32) NOT NULL UNIQUE, "file_name" varchar(255) NOT NULL, "url" '
        'text NOT NULL, "taken_at" datetime NULL, "is_sorted_yolo" bool NOT NULL, "trip_id" '
        'bigint NOT NULL REFERENCES "trips_trip" ("id") DEFERRABLE INITIALLY DEFERRED, '
        '"uploaded_by_id" varchar(25) NULL)',
        'CREATE INDEX "photos_photo_trip_id_787b2fd2" ON "photos_photo" ("trip_id")',
        'CREATE INDEX "photos_photo_uploaded_by_id_733c230f" ON "photos_photo" ("uploaded_by_id")',
    ],
    "photos_photo_tag_face": [
        'CREATE TABLE "photos_photo_tag_face" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
        '"photo_id" bigint NOT NULL REFERENCES "photos_photo" ("id") DEFERRABLE INITIALLY '
        'DEFERRED, "tagface_id" bigint NOT NULL REFERENCES "photos_tagface" ("id") DEFERRABLE '
        "INITIALLY DEFERRED)",
        'CREATE UNIQUE INDEX "photos_photo_tag_face_photo_id_tagface_id_109424bd_uniq" ON '
        '"photos_photo_tag_face" ("photo_id", "tagface_id")',
        'CREATE INDEX "photos_photo_tag_face_photo_id_8663f98c" ON "photos_photo_tag_face" '
        '("photo_id")',
        'CREATE INDEX "photos_photo_tag_face_tagface_id_a56309b6" ON "photos_photo_tag_face" '
        '("tagface_id")',
    ],
}

_DDL_BY_DIALECT = {
    "postgresql": _PG_DDL,
    "mysql": _MYSQL_DDL,
    "mariadb": _MYSQL_DDL,
    "sqlite": _SQLITE_DDL,
}

WEBAPP_TABLES = ("trips_trip", "photos_tagface", "photos_photo", "photos_photo_tag_face")


class InvalidFileKey(AfterTripError):
    """A photos_photo row's file_key is not a UUID (only char(32) columns can hold one)."""


class SharedFoldersError(AfterTripError):
    """The shared "no faces" / "others" rows of photos_tagface are missing or wrong.

    A job refuses to write while they are: on the web app's fresh database its migrations
    create neither, and a person folder would take id 1 or 2 and be shown as "no faces".
    """


SHARED_FOLDERS: tuple[tuple[int, int, str], ...] = (
    (NO_FACE_TAG_ID, -2, "no faces"),
    (OTHERS_TAG_ID, -1, "others"),
)
"""(id, tag_num, custom_name) of the two folders every trip shares."""


def check_shared_folders(*, session: Session) -> None:
    """Raise `SharedFoldersError` unless ids 1 and 2 of photos_tagface hold tag_num -2 and -1."""
    found = dict(
        session.execute(
            select(TagFace.id, TagFace.tag_num).where(TagFace.id.in_(SHARED_TAG_IDS))
        ).all()
    )
    problems = []
    for tag_id, tag_num, name in SHARED_FOLDERS:
        if tag_id not in found:
            problems.append(f"id {tag_id} ({name!r}, tag_num {tag_num}) is missing")
        elif found[tag_id] != tag_num:
            problems.append(
                f"id {tag_id} holds tag_num {found[tag_id]}, not {tag_num} ({name!r}): "
                "a person folder took its place"
            )
    if problems:
        raise SharedFoldersError(
            "the shared folders of photos_tagface are not in place: "
            + "; ".join(problems)
            + ". Run `aftertrip-faces db upgrade` (it creates missing ones); a person folder "
            "holding id 1 or 2 must be moved to a new id by hand first. Nothing was written."
        )


def ensure_shared_folders(*, session: Session) -> list[int]:
    """Create the shared folders where they are missing (idempotent); returns the ids created.

    Runs in the caller's transaction. On PostgreSQL the id sequence is moved past them, or the
    next new folder would collide with id 1. A row at id 1 or 2 with another tag_num is not
    overwritten: `check_shared_folders` then names the problem.
    """
    present = set(session.scalars(select(TagFace.id).where(TagFace.id.in_(SHARED_TAG_IDS))))
    created = []
    for tag_id, tag_num, name in SHARED_FOLDERS:
        if tag_id not in present:
            session.add(TagFace(id=tag_id, tag_num=tag_num, custom_name=name))
            created.append(tag_id)
    session.flush()
    if created and session.get_bind().dialect.name == "postgresql":
        # Explicit ids do not advance an identity column (Django's loaddata resets it the
        # same way).
        session.execute(
            text(
                "SELECT setval(pg_get_serial_sequence('photos_tagface', 'id'), "
                "GREATEST((SELECT max(id) FROM photos_tagface), 1))"
            )
        )
    if created:
        logger.info("shared folders created", extra={"tag_ids": created})
    check_shared_folders(session=session)
    return created


def create_webapp_tables(engine: Engine) -> None:
    """Create the web app's four tables as Django's migrations do, plus tags 1 and 2.

    Only for tests and the embedded demo: in production the web app has created them.
    Tables that already exist are left alone; the shared "no faces" (id 1, tag_num -2) and
    "others" (id 2, tag_num -1) folders are added when absent.
    """
    ddl = _DDL_BY_DIALECT.get(engine.dialect.name)
    if ddl is None:
        raise ValueError(f"no web-app DDL for the {engine.dialect.name} backend")
    existing = set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        for table in WEBAPP_TABLES:
            if table in existing:
                continue
            logger.info("creating web-app table", extra={"table": table})
            for statement in ddl[table]:
                conn.execute(text(statement))
    with Session(engine) as session, session.begin():
        ensure_shared_folders(session=session)


IMPORTED_URL_PREFIX = "import-trip:"
"""`photos_photo.url` of the photos `aftertrip-faces import-trip` made (then the S3 key)."""


def foreign_webapp_data(*, session: Session) -> str | None:
    """Why this database holds web-app data that `import-trip` did not make, or None.

    A database where the web app's own migrations ran (it has `django_migrations`) belongs
    to a web app; so do trips without a photo that import-trip made.
    """
    tables = set(inspect(session.connection()).get_table_names())
    if "django_migrations" in tables:
        return "it is a web app's database (the table django_migrations exists)"
    if Trip.__tablename__ not in tables:
        return None
    imported = (
        select(Photo.id)
        .where(Photo.trip_id == Trip.id, Photo.url.startswith(IMPORTED_URL_PREFIX))
        .exists()
    )
    others = session.scalar(select(func.count()).select_from(Trip).where(~imported))
    if others:
        return f"it holds {others} trip(s) that import-trip did not make"
    return None


def import_group_id(*, session: Session) -> int:
    """The `group_id` for a trip import-trip makes: 1, or on the web app's real schema (which
    has `accounts_group` and a foreign key to it) its first group, made when there is none."""
    if not inspect(session.connection()).has_table("accounts_group"):
        return 1
    found = session.execute(text("SELECT min(id) FROM accounts_group")).scalar()
    if found is not None:
        return int(found)
    # A raw insert, so the naive-local rule of `db.types.UTCDateTime` is applied here: the
    # app's zone on MySQL/MariaDB/SQLite, the instant on PostgreSQL's timestamptz.
    now = utcnow()
    if session.get_bind().dialect.name != "postgresql":
        now = now.astimezone(engine_time_zone(session.get_bind().dialect)).replace(tzinfo=None)
    session.execute(
        text(
            "INSERT INTO accounts_group (created_at, updated_at, name) "
            "VALUES (:now, :now, 'import-trip')"
        ),
        {"now": now},
    )
    return int(session.execute(text("SELECT max(id) FROM accounts_group")).scalar_one())
