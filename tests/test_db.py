"""The database layer on SQLite, PostgreSQL and MariaDB: migrations, mappings and the trip write."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import db.trips
from db.common import MAX_ERROR_CHARS, TripNotFound
from db.jobs import create_job, fail_job, find_queued_or_running_job, finish_job, start_job
from db.models import Base, Face, Job, PhotoAnalysis
from db.photos import photos_to_analyze, trip_photos
from db.schemas import PhotoOutcome
from db.session import (
    VERSION_TABLE,
    alembic_config,
    current_revision,
    downgrade,
    make_engine,
    upgrade,
)
from db.status import trip_status
from db.webapp import (
    NO_FACE_TAG_ID,
    OTHERS_TAG_ID,
    WEBAPP_TABLES,
    Photo,
    TagFace,
    create_webapp_tables,
)
from tasks.write import regroup_trip, store_photo_outcomes, write_trip_result
from tests.plugins.databases import (
    add_photos,
    add_trip,
    create_webapp_schema,
    ensure_group,
    fresh_database,
    load_webapp_schema,
    require_webapp_schema,
)
from tests.support.trips import (
    CAST,
    DETECTOR,
    DIM,
    EMBEDDER,
    SETTINGS,
    People,
)
from tests.support.trips import add_cast_trip as _trip
from tests.support.trips import cast_outcomes as _outcomes
from tests.support.trips import face_outcome as _face
from tests.support.trips import folder_links as _links
from tests.support.trips import photo_outcome as _outcome
from tests.support.trips import snapshot_rows as _snapshot
from tests.support.trips import write_result as _write
from worker.settings import PipelineSettings
from worker.types import ModelInfo


def _tag_of(engine: Engine, photo_ids: list[int], trip_id: int) -> int:
    """The one person folder every photo in `photo_ids` shares."""
    links = _links(engine, trip_id)
    common = set.intersection(*(links[p] for p in photo_ids)) - {NO_FACE_TAG_ID, OTHERS_TAG_ID}
    assert len(common) == 1, (photo_ids, links)
    return common.pop()


def _name(engine: Engine, tag_id: int, name: str) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(TagFace).where(TagFace.id == tag_id).values(custom_name=name))


# ---------------------------------------------------------------------------- migrations


def _schema(engine: Engine, tables: tuple[str, ...]) -> dict[str, object]:
    insp = inspect(engine)
    out: dict[str, object] = {}
    for table in tables:
        out[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in insp.get_columns(table)
            ],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"], str(fk.get("options")))
                for fk in insp.get_foreign_keys(table)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), i["unique"]) for i in insp.get_indexes(table)
            ),
        }
    return out


def test_migrations_leave_the_web_app_tables_unchanged(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        create_webapp_schema(empty_db_url)
        before = _schema(engine, WEBAPP_TABLES)
        assert current_revision(empty_db_url) is None

        upgrade(empty_db_url)
        engine.dispose()
        tables = set(inspect(engine).get_table_names())
        assert {"aftertrip_job", "aftertrip_photo", "aftertrip_face", VERSION_TABLE} <= tables
        assert _schema(engine, WEBAPP_TABLES) == before
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert head is not None and current_revision(empty_db_url) == head
        assert "aftertrip_folder" in tables

        downgrade(empty_db_url, "base")
        engine.dispose()
        tables = set(inspect(engine).get_table_names())
        assert not {t for t in tables if t.startswith("aftertrip_") and t != VERSION_TABLE}
        assert _schema(engine, WEBAPP_TABLES) == before

        upgrade(empty_db_url)  # and back: the downgrade left nothing behind
        with Session(engine) as session:
            shared = session.execute(select(TagFace.id, TagFace.tag_num).order_by(TagFace.id)).all()
        assert [tuple(row) for row in shared] == [(NO_FACE_TAG_ID, -2), (OTHERS_TAG_ID, -1)]
    finally:
        engine.dispose()


def test_chip_size_migration_adds_and_drops_a_nullable_column(empty_db_url: str) -> None:
    """0004 adds aftertrip_face.chip_size (nullable: faces stored before have none) and its
    downgrade drops it, leaving 0003's table."""
    engine = make_engine(empty_db_url)

    def face_columns() -> dict[str, bool]:
        engine.dispose()
        return {c["name"]: c["nullable"] for c in inspect(engine).get_columns("aftertrip_face")}

    try:
        create_webapp_schema(empty_db_url)
        upgrade(empty_db_url, "0003")
        before = face_columns()
        assert "chip_size" not in before
        upgrade(empty_db_url, "0004")
        assert face_columns() == {**before, "chip_size": True}
        downgrade(empty_db_url, "0003")
        assert face_columns() == before
        assert current_revision(empty_db_url) == "0003"
    finally:
        engine.dispose()


@pytest.mark.services
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_project_copy_of_the_web_app_tables_matches_the_real_dump(
    backend: str, tmp_path: Path
) -> None:
    """create_webapp_tables (fresh clones, SQLite) lays out the columns the app's dump has."""
    dump = require_webapp_schema(backend)
    with fresh_database(backend, tmp_path) as real_url, fresh_database(backend, tmp_path) as url:
        load_webapp_schema(real_url, dump)
        real, copy = make_engine(real_url), make_engine(url)
        try:
            create_webapp_tables(copy)
            for table in WEBAPP_TABLES:
                assert (
                    _schema(copy, [table])[table]["columns"]
                    == (_schema(real, [table])[table]["columns"])
                ), table
                assert (
                    _schema(copy, [table])[table]["unique"]
                    == (_schema(real, [table])[table]["unique"])
                ), table
        finally:
            real.dispose()
            copy.dispose()


def test_models_match_the_migration(db_engine: Engine) -> None:
    def worker_tables_only(name, type_, parent_names):  # type: ignore[no-untyped-def]
        return type_ != "table" or (name.startswith("aftertrip_") and name != VERSION_TABLE)

    with db_engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_name": worker_tables_only, "compare_type": True}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_index_and_constraint_names_fit_mysql() -> None:
    names = []
    for table in Base.metadata.sorted_tables:
        names += [c.name for c in table.constraints] + [i.name for i in table.indexes]
    assert names and all(name and len(str(name)) < 64 for name in names)


# ---------------------------------------------------------------------------- web-app mapping


def test_file_key_is_stored_like_django_and_read_as_the_s3_key(db_engine: Engine) -> None:
    key = uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")
    with Session(db_engine) as session, session.begin():
        trip = add_trip(session)
        session.add(Photo(trip_id=trip.id, file_key=key, file_name="a.jpg", url="u"))
    with db_engine.connect() as conn:
        stored = conn.execute(text("SELECT file_key FROM photos_photo")).scalar_one()
    if db_engine.dialect.name == "postgresql":
        assert stored == key  # native uuid
    else:
        assert stored == key.hex  # char(32), no dashes, as Django writes it
    with Session(db_engine) as session:
        photo = session.scalars(select(Photo)).one()
        assert photo.s3_key == "0f8fad5b-d9cb-469f-a165-70867728950e"
        assert photo.is_sorted_yolo is False
        assert photo.created_at.tzinfo is not None


def test_rows_written_by_django_sql_are_read(db_engine: Engine) -> None:
    key = uuid.uuid4()
    stored = str(key) if db_engine.dialect.name == "postgresql" else key.hex
    with Session(db_engine) as session, session.begin():
        ensure_group(session, 7)
    with db_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO trips_trip (created_at, updated_at, group_id, place, departing_date, "
                "arriving_date) VALUES (:t, :t, 7, 'Busan', '2024-05-01', '2024-05-03')"
            ),
            {"t": datetime(2024, 5, 1, 12, 30, 15, 123456)},
        )
        trip_id = conn.execute(text("SELECT max(id) FROM trips_trip")).scalar_one()
        conn.execute(
            text(
                "INSERT INTO photos_photo (created_at, updated_at, file_key, file_name, url, "
                "is_sorted_yolo, trip_id) VALUES (:t, :t, :k, 'x.jpg', 'u', :f, :trip)"
            ),
            {"t": datetime(2024, 5, 1, 12, 30, 15), "k": stored, "f": False, "trip": trip_id},
        )
    # A naive value is local time in the engine's zone (by default the backend's Asia/Seoul,
    # as Django writes with USE_TZ = False); PostgreSQL's timestamptz took it in the session's
    # zone, UTC.
    zone = UTC if db_engine.dialect.name == "postgresql" else ZoneInfo("Asia/Seoul")
    with Session(db_engine) as session:
        (photo,) = trip_photos(session=session, trip_id=trip_id)
        assert photo.s3_key == str(key)
        assert photo.created_at == datetime(2024, 5, 1, 12, 30, 15, tzinfo=zone)


def test_mariadb_native_uuid_column_is_read(
    db_backend: str, request: pytest.FixtureRequest
) -> None:
    """Django >= 5.0 on MariaDB >= 10.7 makes UUIDField a native uuid column."""
    if db_backend != "mariadb":
        pytest.skip("native uuid columns of Django 5 exist on MariaDB only")
    # This test alters the schema: a database of its own.
    db_engine = make_engine(request.getfixturevalue("fresh_db_url"))
    request.addfinalizer(db_engine.dispose)
    with db_engine.begin() as conn:
        conn.execute(text("ALTER TABLE photos_photo MODIFY file_key uuid NOT NULL"))
    key = uuid.uuid4()
    with Session(db_engine) as session, session.begin():
        trip = add_trip(session)
        trip_id = trip.id
    with db_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO photos_photo (created_at, updated_at, file_key, file_name, url, "
                "is_sorted_yolo, trip_id) VALUES (NOW(6), NOW(6), :k, 'x.jpg', 'u', 0, :trip)"
            ),
            {"k": str(key), "trip": trip_id},
        )
    with Session(db_engine) as session:
        (photo,) = trip_photos(session=session, trip_id=trip_id)
        assert photo.s3_key == str(key)


def test_web_app_deletes_cascade_to_worker_rows(db_engine: Engine) -> None:
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(People(), photo_ids, CAST))
    tag = _tag_of(db_engine, [photo_ids[0], photo_ids[1]], trip_id)
    # What Django's Python-side cascade sends: the m2m rows, then the photo; then a folder.
    with db_engine.begin() as conn:
        conn.execute(text(f"DELETE FROM photos_photo_tag_face WHERE photo_id = {photo_ids[0]}"))
        conn.execute(text(f"DELETE FROM photos_photo WHERE id = {photo_ids[0]}"))
        conn.execute(text(f"DELETE FROM photos_photo_tag_face WHERE tagface_id = {tag}"))
        conn.execute(text(f"DELETE FROM photos_tagface WHERE id = {tag}"))
    with Session(db_engine) as session:
        assert not session.scalars(select(Face).where(Face.photo_id == photo_ids[0])).all()
        analysed = session.scalars(select(PhotoAnalysis.photo_id)).all()
        assert photo_ids[0] not in analysed and photo_ids[1] in analysed
        assert not session.scalars(select(Face).where(Face.tagface_id == tag)).all()
        assert session.scalars(select(Face).where(Face.photo_id == photo_ids[1])).all()


# ---------------------------------------------------------------------------- the trip write


def test_write_groups_people_into_folders(db_engine: Engine) -> None:
    trip_id, photo_ids = _trip(db_engine)
    summary = _write(db_engine, trip_id, _outcomes(People(), photo_ids, CAST))

    links = _links(db_engine, trip_id)
    p = photo_ids
    a = _tag_of(db_engine, [p[0], p[1], p[3]], trip_id)
    b = _tag_of(db_engine, [p[0], p[2], p[6]], trip_id)
    c = _tag_of(db_engine, [p[1], p[2]], trip_id)
    assert len({a, b, c}) == 3
    assert links == {
        p[0]: {a, b},
        p[1]: {a, c},
        p[2]: {b, c},
        p[3]: {a},
        p[4]: {NO_FACE_TAG_ID},
        p[5]: {OTHERS_TAG_ID},
        p[6]: {b, OTHERS_TAG_ID},  # B and a face seen once: both, as the prototype did
    }
    assert summary.photos == 7 and summary.faces == 10 and summary.people == 3
    assert (summary.others, summary.no_face, summary.errors) == (2, 1, 0)
    assert (summary.tags_created, summary.tags_deleted, summary.links_added) == (3, 0, 11)

    with Session(db_engine) as session:
        tags = {t.id: t for t in session.scalars(select(TagFace).where(TagFace.id.in_([a, b, c])))}
        assert sorted(t.tag_num for t in tags.values()) == [0, 1, 2]
        assert all(t.custom_name == "" for t in tags.values())
        faces = session.scalars(select(Face).order_by(Face.photo_id, Face.face_index)).all()
        assert len(faces) == 10
        for tag in (a, b, c):
            assert sum(f.is_cover for f in faces if f.tagface_id == tag) == 1
        singles = [f for f in faces if f.group_label == -1]
        assert len(singles) == 2 and all(f.tagface_id == OTHERS_TAG_ID for f in singles)
        assert all(f.matched_face_id is None and f.similarity is None for f in singles)
        grouped = [f for f in faces if f.group_label >= 0]
        by_id = {f.id: f for f in faces}
        for f in grouped:
            assert by_id[f.matched_face_id].tagface_id == f.tagface_id
            assert f.similarity > 0.5
        first = faces[0]
        assert first.embedder_sha256 == EMBEDDER.sha256 and first.embedder_name == "w600k_mbf"
        assert first.vector.shape == (DIM,) and len(first.landmarks) == 5
        analysis = session.scalars(
            select(PhotoAnalysis).where(PhotoAnalysis.photo_id == p[0])
        ).one()
        assert (analysis.status, analysis.face_count, analysis.width) == ("ok", 2, 1000)


def test_two_small_faces_of_one_person_start_no_folder(db_engine: Engine) -> None:
    """The album's small-face rule (`worker.rules.small_faces`) holds in the trip write: two
    small faces of one unknown person (cosine ~0.8) stay in "others", read back with their
    chip size from the rows; a big face of them, added later, founds a folder they join. The
    same two faces with no size (stored before it was kept) start a folder, as before."""
    people = People()
    faces = [_face(people, "S", 0), _face(people, "S", 0), _face(people, "S", 0)]
    sizes = [30.0, 22.0, 90.0]  # small, tiny (under 0.6 of AFTERTRIP_SMALL_FACE=40), big
    trip_id, p = _trip(db_engine, 3)
    sized = [replace(f, chip_size=size) for f, size in zip(faces, sizes, strict=True)]
    summary = _write(db_engine, trip_id, [_outcome(p[i], [sized[i]]) for i in range(2)])
    assert summary.people == 0 and summary.others == 2
    assert _links(db_engine, trip_id) == {p[0]: {OTHERS_TAG_ID}, p[1]: {OTHERS_TAG_ID}}
    with Session(db_engine) as session:
        stored = session.scalars(
            select(Face.chip_size).where(Face.photo_id.in_(p)).order_by(Face.photo_id)
        ).all()
    assert stored == pytest.approx(sizes[:2])

    summary = _write(db_engine, trip_id, [_outcome(p[2], [sized[2]])])
    assert summary.people == 1 and summary.others == 0
    folder = _tag_of(db_engine, p, trip_id)
    assert _links(db_engine, trip_id) == {pid: {folder} for pid in p}

    unsized_trip, q = _trip(db_engine, 2)
    summary = _write(db_engine, unsized_trip, [_outcome(q[i], [faces[i]]) for i in range(2)])
    assert summary.people == 1 and summary.others == 0
    _tag_of(db_engine, q, unsized_trip)


def test_same_write_twice_gives_identical_rows(db_engine: Engine) -> None:
    trip_id, photo_ids = _trip(db_engine)
    outcomes = _outcomes(People(), photo_ids, CAST)
    _write(db_engine, trip_id, outcomes)
    first = _snapshot(db_engine)
    again = _write(db_engine, trip_id, outcomes)  # a redelivered job
    second = _snapshot(db_engine)
    for table in ("links", "tags", "faces"):
        assert second[table] == first[table], table
    assert len(second["faces"]) == 10
    assert (again.tags_created, again.tags_deleted, again.links_added, again.links_removed) == (
        0,
        0,
        0,
        0,
    )


def test_concurrent_writes_of_one_trip_wait_for_each_other(db_engine: Engine) -> None:
    """Two deliveries of one job writing at once: one waits (row lock / SQLite write lock)."""
    trip_id, photo_ids = _trip(db_engine)
    outcomes = _outcomes(People(), photo_ids, CAST)
    barrier = threading.Barrier(2)
    results: list[object] = []

    def deliver() -> None:
        barrier.wait()
        try:
            results.append(_write(db_engine, trip_id, outcomes))
        except Exception as exc:  # reported below, with the other thread's outcome
            results.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not [r for r in results if isinstance(r, Exception)], results
    created = sorted(r.tags_created for r in results)  # type: ignore[attr-defined]
    assert created == [0, 3]  # the second saw the first's folders
    snapshot = _snapshot(db_engine)
    assert len(snapshot["faces"]) == 10 and len(snapshot["links"]) == 11


def test_unique_constraint_refuses_a_duplicate_face(db_engine: Engine) -> None:
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(People(), photo_ids, CAST))
    with Session(db_engine) as session:
        face = session.scalars(select(Face).order_by(Face.id)).first()
        copy = Face(
            photo_id=face.photo_id,
            face_index=face.face_index,
            x1=0,
            y1=0,
            x2=1,
            y2=1,
            landmarks=[],
            score=1.0,
            embedding=face.embedding,
            embedder_name=face.embedder_name,
            embedder_sha256=face.embedder_sha256,
        )
        session.add(copy)
        with pytest.raises(IntegrityError):
            session.flush()


def test_named_person_keeps_folder_when_photos_are_added(db_engine: Engine) -> None:
    people = People()
    trip_id, photo_ids = _trip(db_engine, len(CAST) + 2)
    first, new = photo_ids[: len(CAST)], photo_ids[len(CAST) :]
    _write(db_engine, trip_id, _outcomes(people, first, CAST))
    alice = _tag_of(db_engine, [first[0], first[1], first[3]], trip_id)
    _name(db_engine, alice, "Alice")

    with Session(db_engine) as session:
        todo = photos_to_analyze(
            session=session, trip_id=trip_id, embedder_sha256=EMBEDDER.sha256, mode="missing"
        )
        assert [p.id for p in todo] == new
    # New photos: A with someone new (F), and F again: F becomes a new person.
    summary = _write(db_engine, trip_id, _outcomes(people, new, [["A", "F"], ["F"]]))
    assert summary.tags_created == 1 and summary.people == 4
    assert _tag_of(db_engine, [first[0], first[3], new[0]], trip_id) == alice
    with Session(db_engine) as session:
        tag = session.get(TagFace, alice)
        assert tag.custom_name == "Alice"
        nums = session.scalars(
            select(TagFace.tag_num).where(TagFace.id.in_(_links(db_engine, trip_id)[new[1]]))
        ).all()
        assert nums == [3]  # next free number among the trip's folders


@pytest.mark.parametrize("shift", [4.0, 60.0], ids=["boxes-moved-a-little", "boxes-moved-a-lot"])
def test_named_person_keeps_folder_after_reanalysis(db_engine: Engine, shift: float) -> None:
    """mode=all: every face re-detected (new boxes, new embeddings).

    A small move keeps each face's folder through box overlap; a large one (no overlap)
    falls back to mean-embedding similarity. Either way Alice stays Alice.
    """
    people = People()
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(people, photo_ids, CAST))
    alice = _tag_of(db_engine, [photo_ids[0], photo_ids[1], photo_ids[3]], trip_id)
    bob = _tag_of(db_engine, [photo_ids[0], photo_ids[2], photo_ids[6]], trip_id)
    _name(db_engine, alice, "Alice")
    before = _links(db_engine, trip_id)

    redone = _outcomes(people, photo_ids, CAST, shift=shift)
    summary = _write(db_engine, trip_id, redone)

    assert _links(db_engine, trip_id) == before  # same folders, same photos
    assert summary.tags_created == 0 and summary.tags_deleted == 0
    with Session(db_engine) as session:
        assert session.get(TagFace, alice).custom_name == "Alice"
        assert session.get(TagFace, bob) is not None
        faces = session.scalars(select(Face)).all()
        assert len(faces) == 10
        assert {round(f.x1 - 100.0 * f.face_index, 3) for f in faces} == {shift}


def test_named_person_keeps_folder_after_an_embedder_change(db_engine: Engine) -> None:
    """A new embedder (another sha256) analyses every photo again, in another vector space."""
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(People(seed=0), photo_ids, CAST))
    alice = _tag_of(db_engine, [photo_ids[0], photo_ids[1], photo_ids[3]], trip_id)
    _name(db_engine, alice, "Alice")
    before = _links(db_engine, trip_id)

    new_embedder = ModelInfo(name="w600k_r50", role="embedder", path="/m/r50.onnx", sha256="a" * 64)
    with Session(db_engine) as session:
        todo = photos_to_analyze(
            session=session, trip_id=trip_id, embedder_sha256=new_embedder.sha256, mode="missing"
        )
        assert [p.id for p in todo] == photo_ids
        session.commit()  # end the read transaction: the write runs its own
        summary = write_trip_result(
            session=session,
            trip_id=trip_id,
            analyzed=_outcomes(People(seed=1), photo_ids, CAST, shift=2.0),
            embedder=new_embedder,
            settings=PipelineSettings(similarity_threshold=0.3),
        )
    assert summary.tags_created == 0 and summary.faces == 10
    assert _links(db_engine, trip_id) == before
    with Session(db_engine) as session:
        assert session.get(TagFace, alice).custom_name == "Alice"
        # The old embedder's faces stay (a switch back finds them), the new ones are added.
        assert len(session.scalars(select(Face)).all()) == 20


def test_reanalysis_with_fewer_faces_leaves_no_dangling_match(db_engine: Engine) -> None:
    people = People()
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(people, photo_ids, CAST))
    # Photo 0 now shows only A (B was a false detection, say); photo 6 only E.
    fewer = [["A"], *CAST[1:6], ["E"]]
    summary = _write(db_engine, trip_id, _outcomes(people, photo_ids, fewer))
    assert summary.faces == 8
    with Session(db_engine) as session:
        faces = {f.id: f for f in session.scalars(select(Face))}
        assert len(faces) == 8
        for face in faces.values():
            if face.group_label >= 0:
                assert face.matched_face_id in faces
                assert faces[face.matched_face_id].tagface_id == face.tagface_id
    # B is left in photo 2 only: a face seen once, so B's unnamed folder goes.
    assert summary.people == 2 and summary.tags_deleted == 1
    links = _links(db_engine, trip_id)
    carol = _tag_of(db_engine, [photo_ids[1], photo_ids[2]], trip_id)
    assert links[photo_ids[2]] == {carol, OTHERS_TAG_ID}
    assert links[photo_ids[6]] == {OTHERS_TAG_ID}


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_empty_folder_deleted_unless_named(db_engine: Engine, named: bool) -> None:
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(People(), photo_ids, CAST))
    carol = _tag_of(db_engine, [photo_ids[1], photo_ids[2]], trip_id)
    if named:
        _name(db_engine, carol, "Carol")
    # The web app soft-deletes both photos of C: C's folder is left with no photo.
    with Session(db_engine) as session, session.begin():
        session.execute(
            update(Photo)
            .where(Photo.id.in_([photo_ids[1], photo_ids[2]]))
            .values(deleted_at=datetime.now(UTC))
        )
    summary = _write(db_engine, trip_id, [])

    links = _links(db_engine, trip_id)
    assert photo_ids[1] not in links and photo_ids[2] not in links  # deleted photos: no links
    assert all(carol not in tags for tags in links.values())
    with Session(db_engine) as session:
        tag = session.get(TagFace, carol)
        if named:
            assert tag is not None and tag.custom_name == "Carol"
            assert summary.tags_deleted == 0
        else:
            assert tag is None
            assert summary.tags_deleted == 1
        # The shared folders are never deleted.
        assert session.get(TagFace, NO_FACE_TAG_ID) and session.get(TagFace, OTHERS_TAG_ID)
        # A and B still have their folders; A's remaining photos are p0 and p3.
    assert _tag_of(db_engine, [photo_ids[0], photo_ids[3]], trip_id)
    assert summary.photos == 5


def test_failure_in_the_middle_leaves_everything_as_it_was(
    db_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    people = People()
    trip_id, photo_ids = _trip(db_engine, len(CAST) + 1)
    first = photo_ids[: len(CAST)]
    _write(db_engine, trip_id, _outcomes(people, first, CAST))
    before = _snapshot(db_engine)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("database went away")

    monkeypatch.setattr(db.trips.TripRows, "replace_links", broken)
    changed = _outcomes(people, first, CAST, shift=3.0)
    changed.append(_outcome(photo_ids[-1], [_face(people, "A", 0), _face(people, "G", 1)]))
    changed[5] = PhotoOutcome(photo_ids[5], "corrupt", "truncated JPEG", None, None, [])
    with pytest.raises(RuntimeError, match="went away"):
        _write(db_engine, trip_id, changed)
    assert _snapshot(db_engine) == before

    monkeypatch.undo()
    summary = _write(db_engine, trip_id, changed)
    assert summary.errors == 1 and summary.photos == len(CAST) + 1
    assert _snapshot(db_engine) != before


def test_failed_photo_keeps_its_previous_faces(db_engine: Engine) -> None:
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(People(), photo_ids, CAST))
    before = _links(db_engine, trip_id)
    failed = PhotoOutcome(photo_ids[0], "missing", "NoSuchKey: photo gone from S3", None, None, [])
    summary = _write(db_engine, trip_id, [failed])
    assert summary.errors == 1
    assert _links(db_engine, trip_id) == before
    with Session(db_engine) as session:
        assert len(session.scalars(select(Face).where(Face.photo_id == photo_ids[0])).all()) == 2
        status = trip_status(session=session, trip_id=trip_id, embedder_sha256=EMBEDDER.sha256)
        assert [(e.photo_id, e.status, e.error) for e in status.errors] == [
            (photo_ids[0], "missing", "NoSuchKey: photo gone from S3")
        ]
        assert (status.photos, status.analyzed, status.faces, status.people) == (7, 7, 10, 3)
        # A failed photo is analysed again by the next "missing" job.
        todo = photos_to_analyze(
            session=session, trip_id=trip_id, embedder_sha256=EMBEDDER.sha256, mode="missing"
        )
        assert [p.id for p in todo] == [photo_ids[0]]


def test_photos_to_analyze_in_both_modes(db_engine: Engine) -> None:
    trip_id, photo_ids = _trip(db_engine, 4)
    with Session(db_engine) as session, session.begin():
        other_trip = add_trip(session, place="Seoul")
        add_photos(session, other_trip.id, 2)
        session.execute(
            update(Photo).where(Photo.id == photo_ids[3]).values(deleted_at=datetime.now(UTC))
        )

    def ids(mode: str, sha: str = EMBEDDER.sha256) -> list[int]:
        with Session(db_engine) as session:
            photos = photos_to_analyze(
                session=session, trip_id=trip_id, embedder_sha256=sha, mode=mode
            )
            return [p.id for p in photos]

    live = photo_ids[:3]
    assert ids("missing") == live and ids("all") == live
    people = People()
    _write(
        db_engine,
        trip_id,
        [
            _outcome(photo_ids[0], [_face(people, "A", 0)]),
            PhotoOutcome(photo_ids[1], "unsupported", "not an image", None, None, []),
        ],
    )
    assert ids("missing") == [photo_ids[1], photo_ids[2]]
    assert ids("all") == live
    assert ids("missing", sha="f" * 64) == live  # another embedder: nothing done yet
    with pytest.raises(ValueError):
        ids("some")
    # A photo with an error and no earlier success is in no folder.
    assert set(_links(db_engine, trip_id)) == {photo_ids[0]}


def test_write_refuses_an_open_transaction_and_foreign_photos(db_engine: Engine) -> None:
    trip_id, photo_ids = _trip(db_engine)
    with Session(db_engine) as session, session.begin():
        other = add_trip(session, place="Seoul")
        (stranger,) = add_photos(session, other.id, 1)
        stranger_id = stranger.id
    with Session(db_engine) as session:
        trip_photos(session=session, trip_id=trip_id)  # a read opens a transaction
        with pytest.raises(ValueError, match="own transaction"):
            write_trip_result(
                session=session, trip_id=trip_id, analyzed=[], embedder=EMBEDDER, settings=SETTINGS
            )
    with pytest.raises(ValueError, match="other trips"):
        _write(db_engine, trip_id, [_outcome(stranger_id, [])])
    with pytest.raises(TripNotFound):
        _write(db_engine, 10**9, [])
    assert _snapshot(db_engine)["faces"] == []


# ---------------------------------------------------------------------------- jobs


def test_job_lifecycle_and_redelivery(db_engine: Engine) -> None:
    trip_id, _ = _trip(db_engine, 1)
    mtcnn = [
        ModelInfo(name=f"mtcnn_{n}", role="detector", path=f"/m/{n}.pt", sha256=c * 64)
        for n, c in (("pnet", "1"), ("rnet", "2"), ("onet", "3"))
    ]
    with Session(db_engine) as session:
        assert find_queued_or_running_job(session=session, trip_id=trip_id) is None
        queued = create_job(session=session, trip_id=trip_id, mode="missing", task_id="t-1")
        assert find_queued_or_running_job(session=session, trip_id=trip_id).id == queued.id

        job = start_job(
            session=session,
            trip_id=trip_id,
            mode="missing",
            task_id="t-1",
            models=[*mtcnn, EMBEDDER],
        )
        assert job.id == queued.id and job.status == "running" and job.attempts == 1
        assert job.detector_name == "mtcnn_pnet+mtcnn_rnet+mtcnn_onet"
        assert len(job.detector_sha256) == 64 and job.embedder_sha256 == EMBEDDER.sha256
        assert len(job.models) == 4

        again = start_job(
            session=session,
            trip_id=trip_id,
            mode="missing",
            task_id="t-1",
            models=[DETECTOR, EMBEDDER],
        )
        assert again.id == job.id and again.attempts == 2
        assert again.detector_name == "scrfd_500m_bnkps" and again.detector_sha256 == "d" * 64
        finish_job(session=session, job_id=job.id, counts={"photos": 7, "people": 3})

        other = start_job(
            session=session, trip_id=trip_id, mode="all", task_id=None, models=[DETECTOR, EMBEDDER]
        )
        session.execute(text("SELECT 1"))  # an open transaction fail_job must cope with
        fail_job(session=session, job_id=other.id, error="x" * 20_000)
        job_id, other_id = job.id, other.id
        with pytest.raises(ValueError):
            start_job(session=session, trip_id=trip_id, mode="sometimes", task_id=None, models=[])

    with Session(db_engine) as session:
        assert find_queued_or_running_job(session=session, trip_id=trip_id) is None
        done = session.get(Job, job_id)
        assert done.status == "succeeded" and done.counts == {"photos": 7, "people": 3}
        assert done.finished_at >= done.started_at >= done.created_at
        assert done.finished_at.tzinfo is not None
        failed = session.get(Job, other_id)
        assert failed.status == "failed" and len(failed.error) == MAX_ERROR_CHARS
        status = trip_status(session=session, trip_id=trip_id, limit=5)
        assert [j.id for j in status.jobs] == [other_id, job_id]
        assert status.embedder_sha256 == EMBEDDER.sha256
        with pytest.raises(TripNotFound):
            trip_status(session=session, trip_id=10**9)


def test_folder_cover_follows_the_result_files_rule(db_engine: Engine) -> None:
    """The cover is the face the result file names (worker.detect.cover_score): a clear face
    beats a blurrier one that is a little larger."""
    from worker.boxes import cover_score

    trip_id, photo_ids = _trip(db_engine, 3)
    people = People(seed=5)
    sizes_scores = [(100.0, 0.99), (130.0, 0.6), (50.0, 0.95)]
    outcomes = []
    for pid, (side, score) in zip(photo_ids, sizes_scores, strict=True):
        face = replace(
            _face(people, "A", 0), box=(10.0, 10.0, 10.0 + side, 10.0 + side), score=score
        )
        outcomes.append(_outcome(pid, [face]))
    boxes = np.array([f.faces[0].box for f in outcomes])
    scores = np.array([s for _, s in sizes_scores])
    assert int(np.argmax(cover_score(scores, boxes))) == 0
    assert int(np.argmax(scores * (boxes[:, 2] - boxes[:, 0]) ** 2)) == 1  # area would pick 1
    _write(db_engine, trip_id, outcomes)
    with Session(db_engine) as session:
        covers = session.scalars(select(Face).where(Face.is_cover.is_(True))).all()
        assert [f.photo_id for f in covers] == [photo_ids[0]]


# ---------------------------------------------------------------------------- store + regroup


def _store(engine: Engine, trip_id: int, outcomes: list[PhotoOutcome], job_id: int | None):
    with Session(engine) as session:
        return store_photo_outcomes(
            session=session, trip_id=trip_id, outcomes=outcomes, embedder=EMBEDDER, job_id=job_id
        )


def _regroup(engine: Engine, trip_id: int, job_id: int | None = None):
    with Session(engine) as session:
        return regroup_trip(
            session=session, trip_id=trip_id, embedder=EMBEDDER, settings=SETTINGS, job_id=job_id
        )


def _job(engine: Engine, trip_id: int, mode: str = "missing") -> int:
    with Session(engine) as session:
        return create_job(session=session, trip_id=trip_id, mode=mode).id


def _by_position(engine: Engine, trip_id: int, photo_ids: list[int]) -> list[frozenset[int]]:
    """Each photo's folders as the partition of photo positions they make (ids differ)."""
    links = _links(engine, trip_id)
    members: dict[int, set[int]] = {}
    for position, photo_id in enumerate(photo_ids):
        for tag in links.get(photo_id, set()):
            members.setdefault(tag, set()).add(position)
    return sorted(
        (frozenset(v) for t, v in members.items() if t not in (NO_FACE_TAG_ID, OTHERS_TAG_ID)),
        key=sorted,
    )


def test_batches_then_regroup_equal_one_write(db_engine: Engine) -> None:
    people = People()
    outcomes = _outcomes(people, list(range(len(CAST))), CAST)
    one_trip, one_ids = _trip(db_engine)
    for outcome, photo_id in zip(outcomes, one_ids, strict=True):
        outcome.photo_id = photo_id
    _write(db_engine, one_trip, outcomes)

    trip_id, photo_ids = _trip(db_engine)
    batched = _outcomes(People(), photo_ids, CAST)
    job_id = _job(db_engine, trip_id)
    failed = PhotoOutcome(photo_ids[4], "corrupt", "truncated JPEG", None, None, [])
    assert _store(db_engine, trip_id, batched[:3], job_id) == 0
    assert _store(db_engine, trip_id, [failed, *batched[5:]], job_id) == 1
    assert _links(db_engine, trip_id) == {}  # stores write no folders
    assert _store(db_engine, trip_id, batched[3:5], job_id) == 0  # photo 4 again, now ok
    assert _store(db_engine, trip_id, batched[3:5], job_id) == 0  # a redelivered batch
    summary = _regroup(db_engine, trip_id, job_id)
    assert (summary.photos, summary.faces, summary.people, summary.errors) == (7, 10, 3, 0)
    assert _by_position(db_engine, trip_id, photo_ids) == _by_position(db_engine, one_trip, one_ids)
    before = _snapshot(db_engine)
    again = _regroup(db_engine, trip_id, job_id)
    assert _snapshot(db_engine) == before
    assert (again.tags_created, again.links_added, again.links_removed) == (0, 0, 0)
    with Session(db_engine) as session:
        faces = session.scalars(
            select(Face).join(Photo, Photo.id == Face.photo_id).where(Photo.trip_id == trip_id)
        ).all()
        assert len(faces) == 10  # nothing stored twice
        jobs = session.scalars(
            select(PhotoAnalysis.job_id).where(PhotoAnalysis.photo_id.in_(photo_ids))
        ).all()
        assert set(jobs) == {job_id}


def test_stored_faces_keep_their_folder_until_the_regroup(db_engine: Engine) -> None:
    """A batch re-analysed between two regroups: faces moved a little carry their folder on
    their rows; moved a lot (no overlap), the folder's remembered direction finds them."""
    people = People()
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(people, photo_ids, CAST))
    alice = _tag_of(db_engine, [photo_ids[0], photo_ids[1], photo_ids[3]], trip_id)
    _name(db_engine, alice, "Alice")
    before = _links(db_engine, trip_id)
    job_id = _job(db_engine, trip_id, "all")

    _store(db_engine, trip_id, _outcomes(people, photo_ids[:2], CAST[:2], shift=4.0), job_id)
    with Session(db_engine) as session:
        carried = session.scalars(
            select(Face.tagface_id).where(Face.photo_id.in_(photo_ids[:2]), Face.face_index == 0)
        ).all()
        assert carried == [alice, alice]
    _store(db_engine, trip_id, _outcomes(people, photo_ids, CAST, shift=60.0), job_id)
    summary = _regroup(db_engine, trip_id, job_id)
    assert _links(db_engine, trip_id) == before
    assert summary.tags_created == 0 and summary.tags_deleted == 0
    with Session(db_engine) as session:
        assert session.get(TagFace, alice).custom_name == "Alice"


def test_a_retried_job_skips_what_it_stored(db_engine: Engine) -> None:
    people = People()
    trip_id, photo_ids = _trip(db_engine)
    _write(db_engine, trip_id, _outcomes(people, photo_ids, CAST))
    job_id = _job(db_engine, trip_id, "all")
    failed = PhotoOutcome(photo_ids[2], "corrupt", "truncated JPEG", None, None, [])
    _store(db_engine, trip_id, [*_outcomes(people, photo_ids[:2], CAST[:2]), failed], job_id)

    def todo(mode: str, job: int | None) -> list[int]:
        with Session(db_engine) as session:
            photos = photos_to_analyze(
                session=session,
                trip_id=trip_id,
                embedder_sha256=EMBEDDER.sha256,
                mode=mode,  # type: ignore[arg-type]
                job_id=job,
            )
            return [p.id for p in photos]

    assert todo("all", job_id) == photo_ids[3:]
    assert todo("all", None) == photo_ids
    assert todo("all", _job(db_engine, trip_id, "all")) == photo_ids  # another job: all
    assert todo("missing", None) == [photo_ids[2]]
    assert todo("missing", job_id) == []


def test_store_refuses_photos_of_other_trips_and_duplicates(db_engine: Engine) -> None:
    trip_id, photo_ids = _trip(db_engine, 2)
    with Session(db_engine) as session, session.begin():
        other = add_trip(session, place="Seoul")
        (stranger,) = add_photos(session, other.id, 1)
        stranger_id = stranger.id
    with pytest.raises(ValueError, match="other trips"):
        _store(db_engine, trip_id, [_outcome(stranger_id, [])], None)
    with pytest.raises(ValueError, match="twice"):
        _store(db_engine, trip_id, [_outcome(photo_ids[0], []), _outcome(photo_ids[0], [])], None)
    with pytest.raises(TripNotFound):
        _store(db_engine, 10**9, [], None)
    with Session(db_engine) as session:
        trip_photos(session=session, trip_id=trip_id)
        with pytest.raises(ValueError, match="own transaction"):
            regroup_trip(
                session=session, trip_id=trip_id, embedder=EMBEDDER, settings=SETTINGS, job_id=None
            )
    assert _snapshot(db_engine)["analyses"] == []
