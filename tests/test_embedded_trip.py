"""The embedded default: SQLite, photos in a local folder, the job run by the admin command."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from db.session import make_engine, make_sessionmaker, upgrade
from db.webapp import NO_FACE_TAG_ID, Photo, PhotoTagFace, create_webapp_tables
from tests.plugins.databases import add_photos, add_trip
from tests.support.files import vectron_image_path


def test_rerun_inline_fills_the_web_app_tables_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from tasks.cli import main
    from tasks.settings import get_settings

    url = f"sqlite:///{tmp_path / 'webapp.sqlite3'}"
    engine = make_engine(url)
    create_webapp_tables(engine)
    sessions = make_sessionmaker(engine)
    photo_root = tmp_path / "bucket"
    photo_root.mkdir()
    files = ["players.jpg", "yaoming.jpg", "gdp.jpg", None]
    with sessions.begin() as session:
        trip = add_trip(session)
        photos = add_photos(session, trip.id, len(files))
        trip_id = trip.id
        keys = {p.id: p.s3_key for p in photos}
    for key, name in zip(keys.values(), files, strict=True):
        if name is None:
            Image.new("RGB", (300, 200), (90, 150, 230)).save(photo_root / key, "JPEG")
        else:
            (photo_root / key).write_bytes(vectron_image_path(name).read_bytes())
    monkeypatch.setenv("AFTERTRIP_DATABASE_URL", url)
    monkeypatch.setenv("AFTERTRIP_PHOTO_ROOT", str(photo_root))
    monkeypatch.delenv("AFTERTRIP_S3_BUCKET", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
        assert main(["rerun", "--trip", str(trip_id), "--inline"]) == 0
    finally:
        get_settings.cache_clear()
    upgrade(url)  # idempotent
    with sessions() as session:
        links = session.execute(select(PhotoTagFace.photo_id, PhotoTagFace.tagface_id)).all()
        by_photo: dict[int, set[int]] = {}
        for photo_id, tag in links:
            by_photo.setdefault(photo_id, set()).add(tag)
        ids = [p.id for p in session.scalars(select(Photo).order_by(Photo.id))]
    players, yaoming, gdp, sky = ids
    assert by_photo[sky] == {NO_FACE_TAG_ID}
    shared = by_photo[players] & by_photo[yaoming]
    assert len(shared) == 1 and shared.isdisjoint({1, 2})
    assert gdp in by_photo
    thumbs = list((photo_root / "faces").rglob("*.jpg"))
    assert thumbs, "face thumbnails were not written under the thumbnail prefix"
