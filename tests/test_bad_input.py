"""Hostile albums through the real command line (`python -m tasks.cli`, a subprocess each).

A symlink loop, a FIFO, links to the user's photos elsewhere, Rich markup in folder names,
photo names and file bytes: each must end as that photo's status (or be printed as it is),
never as a crash or a hang; a run where no photo could be read exits non-zero.

A file name cannot hold `/`, so names on disk carry opening tags (`[bold red]`: as markup
they would vanish and restyle the line) and names in the web app's tables carry closing
ones (`[/bold] Mina`: as markup, a MarkupError).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.support.files import ROOT, vectron_image_path

# The FIFO would make a careless reader wait forever: the subprocess timeout turns a hang
# into a failure instead of a stuck test run.
CLI_TIMEOUT = 300
MARKUP_BYTES = b"[/b] this file is not a photo [red]at all"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`aftertrip-faces ARGS` as a user types it, in a wide terminal (no wrapped names)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", *args],
        cwd=ROOT,
        env={**base, "COLUMNS": "400", "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )


def statuses(out: Path) -> dict[str, dict[str, Any]]:
    """file name -> its entry in result.json."""
    photos = json.loads((out / "result.json").read_text())["photos"]
    return {p["path"].rsplit("/", 1)[-1]: p for p in photos}


def assert_no_crash(run: subprocess.CompletedProcess[str]) -> None:
    output = run.stdout + run.stderr
    assert "Traceback" not in output and "MarkupError" not in output, output


def test_group_hostile_album_gives_each_file_its_status(tmp_path: Path) -> None:
    elsewhere = tmp_path / "Pictures"  # the user's own photos, outside the album folder
    elsewhere.mkdir()
    (elsewhere / "gdp.jpg").write_bytes(vectron_image_path("gdp.jpg").read_bytes())
    album = tmp_path / "[bold red]Mina"
    album.mkdir()
    (album / "players.jpg").write_bytes(vectron_image_path("players.jpg").read_bytes())
    (album / "[red] x.jpg").write_bytes(vectron_image_path("yaoming.jpg").read_bytes())
    (album / "linked.jpg").symlink_to(elsewhere / "gdp.jpg")
    (album / "loop.jpg").symlink_to(album / "loop.jpg")
    os.mkfifo(album / "pipe.jpg")
    (album / "markup.jpg").write_bytes(MARKUP_BYTES)

    out = tmp_path / "out"
    run = cli("group", str(album), "--out", str(out), "--quiet", "--detector", "scrfd")
    assert_no_crash(run)
    assert run.returncode == 0, run.stdout + run.stderr
    found = statuses(out)
    assert set(found) == {
        "players.jpg",
        "[red] x.jpg",
        "linked.jpg",
        "loop.jpg",
        "pipe.jpg",
        "markup.jpg",
    }
    assert found["players.jpg"]["status"] == "ok"
    assert found["[red] x.jpg"]["status"] == "ok"
    assert found["linked.jpg"]["status"] == "ok", found["linked.jpg"]  # followed, not "outside"
    assert found["loop.jpg"]["status"] == "missing"
    assert "symbolic link loop" in found["loop.jpg"]["error"]
    assert found["pipe.jpg"]["status"] == "unsupported"
    assert "named pipe" in found["pipe.jpg"]["error"]
    assert found["markup.jpg"]["status"] == "unsupported"
    # every user-controlled string is printed as it is
    assert "[red] x.jpg" in run.stdout  # in the people table
    assert f"{album}/loop.jpg" in run.stdout  # the folder name in an error line
    assert "b'[/b] this fi" in run.stdout  # the file's first bytes in its error


def test_group_exits_non_zero_when_no_photo_could_be_read(tmp_path: Path) -> None:
    album = tmp_path / "album"
    album.mkdir()
    (album / "loop.jpg").symlink_to(album / "loop.jpg")
    os.mkfifo(album / "pipe.jpg")
    (album / "notes.jpg").write_bytes(MARKUP_BYTES)
    (album / "dangling.jpg").symlink_to(tmp_path / "deleted.jpg")

    out = tmp_path / "out"
    run = cli("group", str(album), "--out", str(out), "--quiet", "--detector", "scrfd")
    assert_no_crash(run)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "none of the 4 files" in run.stdout
    found = statuses(out)  # the result is still written, with each file's reason
    assert {name: p["status"] for name, p in found.items()} == {
        "loop.jpg": "missing",
        "pipe.jpg": "unsupported",
        "notes.jpg": "unsupported",
        "dangling.jpg": "missing",
    }
    assert "does not exist" in found["dangling.jpg"]["error"]


def test_group_of_an_empty_folder_exits_non_zero(tmp_path: Path) -> None:
    run = cli("group", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet")
    assert_no_crash(run)
    assert run.returncode == 1 and "no photos found" in run.stdout, run.stdout + run.stderr


def test_status_prints_markup_in_names_and_errors_as_text(tmp_path: Path) -> None:
    from db.models import PhotoAnalysis
    from db.session import make_engine, make_sessionmaker
    from db.webapp import OTHERS_TAG_ID, Photo, PhotoTagFace, TagFace

    folder = tmp_path / "[bold]Mina"
    folder.mkdir()
    # Yao Ming is in both photos: one person folder with both names in its row
    (folder / "yaoming.jpg").write_bytes(vectron_image_path("yaoming.jpg").read_bytes())
    (folder / "players.jpg").write_bytes(vectron_image_path("players.jpg").read_bytes())
    (folder / "[b]notes.jpg").write_bytes(MARKUP_BYTES)
    photo_root = tmp_path / "bucket"
    photo_root.mkdir()
    url = f"sqlite:///{tmp_path / 'webapp.sqlite3'}"
    env = {
        "AFTERTRIP_DATABASE_URL": url,
        "AFTERTRIP_PHOTO_ROOT": str(photo_root),
        "AFTERTRIP_DETECTOR": "scrfd",
    }
    outputs = []
    for args in (
        ("db", "upgrade", "--with-webapp-tables"),
        ("import-trip", str(folder), "--place", "[/i] Jeju"),
        ("rerun", "--trip", "1", "--inline"),
    ):
        run = cli(*args, env=env)
        assert_no_crash(run)
        assert run.returncode == 0, f"{args}: {run.stdout}{run.stderr}"
        outputs.append(run.stdout)
    assert f"trip 1: 3 photos from {folder}" in outputs[1]

    # the web app's users name a folder with markup-like text
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            tag = session.scalars(
                select(PhotoTagFace.tagface_id).where(PhotoTagFace.tagface_id > OTHERS_TAG_ID)
            ).first()
            assert tag is not None, "the trip has a person folder"
            session.execute(
                update(TagFace).where(TagFace.id == tag).values(custom_name="[/bold] Mina")
            )
            session.execute(
                update(Photo)
                .where(Photo.file_name == "yaoming.jpg")
                .values(file_name="[/red] x.jpg")
            )
            errors = session.scalars(
                select(PhotoAnalysis.error).where(PhotoAnalysis.error.is_not(None))
            )
            assert any("[/b]" in (error or "") for error in errors)
    finally:
        engine.dispose()

    status = cli("status", "--trip", "1", env=env)
    assert_no_crash(status)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "[/bold] Mina" in status.stdout  # the folder's name
    assert "[/red] x.jpg" in status.stdout  # a photo's name in the folder's row
    assert "[b]notes.jpg" in status.stdout and "b'[/b] this fi" in status.stdout  # the failed photo


@pytest.mark.parametrize("name", ["[bold]Mina", "[red]x", "Mina [link=x]"])
def test_errors_about_a_markup_path_are_printed_as_text(tmp_path: Path, name: str) -> None:
    env = {
        "AFTERTRIP_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "AFTERTRIP_PHOTO_ROOT": str(tmp_path),
    }
    empty = tmp_path / name
    empty.mkdir()
    run = cli("import-trip", str(empty), env=env)
    assert_no_crash(run)
    assert run.returncode == 2 and f"no photos in {empty}" in run.stdout, run.stdout + run.stderr


# --- bad configuration in production ------------------------------------------------------


def _service_settings(**values: Any) -> Any:
    """ServiceSettings from keyword values (the fields are typed; the tests pass strings)."""
    from tasks.settings import ServiceSettings

    return ServiceSettings(**values)


PRODUCTION: dict[str, Any] = {
    "environment": "production",
    "database_url": "postgresql+psycopg://u@db/x",
    "s3_bucket": "photos",
}


@pytest.mark.parametrize("model", ["embedder", "scrfd"])
def test_production_refuses_a_model_path_without_its_sha256(tmp_path: Path, model: str) -> None:
    from pydantic import ValidationError

    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"not really a model")
    with pytest.raises(ValidationError) as info:
        _service_settings(**PRODUCTION, **{f"{model}_path": str(weights)})
    message = str(info.value)
    assert f"AFTERTRIP_{model.upper()}_PATH is given without AFTERTRIP_{model.upper()}_SHA256" in (
        message
    )
    assert f"sha256sum {weights}" in message
    # with its sha256 it is accepted, and in development a path alone still is (with a warning)
    _service_settings(**PRODUCTION, **{f"{model}_path": str(weights), f"{model}_sha256": "ab" * 32})
    _service_settings(**{f"{model}_path": str(weights)})


def test_model_path_without_sha256_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from worker.models import resolve_model, sha256_of

    weights = tmp_path / "custom.onnx"
    weights.write_bytes(b"weights")
    with caplog.at_level("WARNING", logger="worker.models"):
        resolve_model("w600k_mbf", override=str(weights))
    (record,) = [r for r in caplog.records if "without an expected sha256" in r.getMessage()]
    assert record.__dict__["sha256"] == sha256_of(weights)


@pytest.mark.parametrize(
    ("auth", "production_ok", "flower_starts"),
    [
        ("ops:", False, False),  # empty password
        (":a-long-pass-phrase", False, False),  # empty user
        ("ops", False, False),  # no password at all
        ("ops:a-long-pass-phrase,admin:", False, False),  # one good entry, one empty password
        ("ops:short", False, True),  # development only
        ("ops:a-long-pass-phrase", True, True),
    ],
)
def test_flower_refuses_an_empty_user_or_password(
    auth: str, production_ok: bool, flower_starts: bool
) -> None:
    from pydantic import SecretStr, ValidationError

    from tasks.admin import flower_command

    if production_ok:
        _service_settings(**PRODUCTION, flower_basic_auth=SecretStr(auth))
    else:
        with pytest.raises(ValidationError, match="AFTERTRIP_FLOWER_BASIC_AUTH"):
            _service_settings(**PRODUCTION, flower_basic_auth=SecretStr(auth))
    development = _service_settings(flower_basic_auth=SecretStr(auth))
    assert (flower_command(development) is not None) is flower_starts


def test_flower_command_says_why_it_refuses(tmp_path: Path) -> None:
    run = cli("flower", env={"AFTERTRIP_FLOWER_BASIC_AUTH": "ops:"})
    assert run.returncode == 2
    assert "without a user or a password" in run.stdout and "ops:" not in run.stdout


def test_import_trip_reads_nothing_outside_its_folder(tmp_path: Path) -> None:
    """Links out of the folder (a system file, the user's other photos), a link loop, a FIFO
    and a subfolder are skipped with a reason; only the folder's own photos become the trip."""
    from db.session import make_engine, make_sessionmaker
    from db.webapp import Photo

    elsewhere = tmp_path / "Pictures"
    elsewhere.mkdir()
    (elsewhere / "gdp.jpg").write_bytes(vectron_image_path("gdp.jpg").read_bytes())
    folder = tmp_path / "album"
    folder.mkdir()
    (folder / "yaoming.jpg").write_bytes(vectron_image_path("yaoming.jpg").read_bytes())
    (folder / "hostname.jpg").symlink_to("/etc/hostname")
    (folder / "gdp.jpg").symlink_to(elsewhere / "gdp.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "sub").mkdir()
    (folder / "sub" / "players.jpg").write_bytes(vectron_image_path("players.jpg").read_bytes())
    url = f"sqlite:///{tmp_path / 'webapp.sqlite3'}"
    env = {"AFTERTRIP_DATABASE_URL": url, "AFTERTRIP_PHOTO_ROOT": str(tmp_path / "bucket")}
    assert cli("db", "upgrade", "--with-webapp-tables", env=env).returncode == 0
    run = cli("import-trip", str(folder), env=env)
    assert_no_crash(run)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "trip 1: 1 photos from" in run.stdout
    for name in ("hostname.jpg", "gdp.jpg", "loop.jpg", "pipe.jpg"):
        assert f"skipped {name}: " in run.stdout, run.stdout
    assert "resolves outside" in run.stdout
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            assert [p.file_name for p in session.scalars(select(Photo))] == ["yaoming.jpg"]
    finally:
        engine.dispose()
    stored = [p for p in (tmp_path / "bucket").rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in stored] == [vectron_image_path("yaoming.jpg").read_bytes()]


def test_import_trip_with_nothing_readable_fails_and_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "album"
    folder.mkdir()
    (folder / "hostname.jpg").symlink_to("/etc/hostname")
    url = f"sqlite:///{tmp_path / 'webapp.sqlite3'}"
    env = {"AFTERTRIP_DATABASE_URL": url, "AFTERTRIP_PHOTO_ROOT": str(tmp_path / "bucket")}
    assert cli("db", "upgrade", "--with-webapp-tables", env=env).returncode == 0
    run = cli("import-trip", str(folder), env=env)
    assert_no_crash(run)
    assert run.returncode == 2
    assert "skipped hostname.jpg: " in run.stdout and "no photos in" in run.stdout
    from db.session import make_engine, make_sessionmaker
    from db.webapp import Trip

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:  # the trip was rolled back
            assert session.scalars(select(Trip)).all() == []
    finally:
        engine.dispose()
