"""`aftertrip-faces status` as an operator reads it at 100 columns: a job in one or two
lines, every time in the web app's zone with its name, and a running job that beats but
stores nothing told apart from a slow one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from db.models import Job, LinkRecord, PhotoAnalysis
from db.session import make_engine
from db.types import utcnow
from tests.plugins.databases import add_photos, add_trip
from tests.support.files import ROOT

AFTERTRIP_FACES = str(Path(sys.executable).with_name("aftertrip-faces"))
SHA = "a" * 64
COUNTS = {
    "analyzed": 48, "photos": 50, "faces": 120, "people": 5, "others": 3, "no_face": 1,
    "errors": 2, "tags_created": 2, "tags_deleted": 0, "links_added": 40, "links_removed": 3,
    "corrections": 2, "corrections_noticed": 1, "corrections_honoured": 2,
    "corrections_overruled": 0, "corrections_followers": 1,
}  # fmt: skip


def _job(trip_id: int, status: str, started: datetime, **fields: object) -> Job:
    job = Job(trip_id=trip_id, mode="all", status=status, attempts=1, created_at=started)
    job.started_at = started
    job.embedder_name, job.embedder_sha256 = "arcface", SHA
    for name, value in fields.items():
        setattr(job, name, value)
    return job


def _stored(photo_id: int, job: Job, at: datetime) -> PhotoAnalysis:
    return PhotoAnalysis(
        photo_id=photo_id, embedder_name="arcface", embedder_sha256=SHA, status="ok",
        analyzed_at=at, updated_at=at, job_id=job.id,
    )  # fmt: skip


def test_status_fits_100_columns_in_the_app_time_zone(db_url: str) -> None:
    engine = make_engine(db_url, time_zone="Asia/Seoul")  # as the worker is configured
    now = utcnow()
    try:
        with Session(engine) as session, session.begin():
            trip = add_trip(session)
            photos = add_photos(session, trip.id, 3)
            done = _job(
                trip.id, "succeeded", datetime(2026, 12, 5, 5, 3, 7, tzinfo=UTC),
                finished_at=datetime(2026, 12, 5, 5, 3, 48, tzinfo=UTC), counts=COUNTS,
            )  # fmt: skip
            failed = _job(
                trip.id, "failed", now - timedelta(hours=2),
                finished_at=now - timedelta(hours=1), error="OperationalError: " + "x " * 200,
            )  # fmt: skip
            # Beats, but stored its last photo 7 minutes ago: stuck, not slow.
            stuck = _job(trip.id, "running", now - timedelta(minutes=10))
            stuck.heartbeat_at = now - timedelta(seconds=4)
            # Beats and stored a photo 5 s ago: slow, nothing to say.
            slow = _job(trip.id, "running", now - timedelta(minutes=2))
            slow.heartbeat_at = now - timedelta(seconds=3)
            session.add_all([done, failed, stuck, slow])
            session.flush()
            session.add(_stored(photos[0].id, stuck, now - timedelta(minutes=7)))
            session.add(_stored(photos[1].id, slow, now - timedelta(seconds=5)))
            session.add(
                LinkRecord(
                    trip_id=trip.id, photo_id=photos[2].id, tagface_id=1, state="added",
                    job_id=done.id, noticed_at=datetime(2026, 12, 5, 5, 3, 40, tzinfo=UTC),
                )
            )  # fmt: skip
            trip_id, ids = trip.id, (done.id, failed.id, stuck.id, slow.id)
    finally:
        engine.dispose()

    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    env.update(
        AFTERTRIP_DATABASE_URL=db_url, AFTERTRIP_WEBAPP_TIME_ZONE="Asia/Seoul",
        PYTHONPATH=str(ROOT), COLUMNS="100",
    )  # fmt: skip
    shown = subprocess.run(
        [AFTERTRIP_FACES, "status", "--trip", str(trip_id), "--limit", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert all(len(line) <= 100 for line in lines), "\n".join(lines)
    assert lines[0].endswith("(times in Asia/Seoul)")

    def block(job_id: int) -> list[str]:
        start = next(i for i, line in enumerate(lines) if line.startswith(f"job {job_id} "))
        end = start + 1
        while end < len(lines) and lines[end].startswith("  ") and lines[end][2] != " ":
            end += 1
        return lines[start:end]

    done_id, failed_id, stuck_id, slow_id = ids
    done_lines = block(done_id)  # where 19 counters wrapped over 9 lines
    assert len(done_lines) == 3, "\n".join(lines)
    head, counts, more = done_lines
    assert "succeeded" in head and "started 2026-12-05 14:03:07 KST  took 41 s" in head
    assert counts == (
        "  48/50 analysed, 120 faces; 5 people, 3 others, 1 no face, 2 errors; links +40 -3, "
        "folders +2 -0"
    )
    assert more == "  corrections 2 (1 new, 2 honoured)"
    assert len(block(failed_id)) <= 3 and "OperationalError" in block(failed_id)[1]
    stuck_lines = block(stuck_id)
    assert "1 photos stored so far; last stored" in stuck_lines[1]
    assert re.search(r"\(7 min ago\); heartbeat \d+ s ago$", stuck_lines[1])
    assert stuck_lines[2].startswith("  STUCK? heartbeat fresh but nothing stored for 7 min")
    slow_lines = block(slow_id)
    assert len(slow_lines) == 2 and re.search(r"\(\d+ s ago\); heartbeat \d+ s ago$", slow_lines[1])
    assert not any("STUCK" in line for line in slow_lines)
    # The corrections' "noticed" column, in the app's zone too.
    assert any("2026-12-05 14:03:40 KST" in line for line in lines), "\n".join(lines)
