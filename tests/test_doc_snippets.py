"""The Python snippets of docs/backend.md and docs/corrections.md, as the backend would use them.

- Every ```python block compiles with Python 3.8's grammar (a real `python3.8` when one is
  found, else `ast.parse(feature_version=(3, 8))`) and imports from `aftertrip_client` only
  names it exports.
- In a virtualenv with the backend's pins (Django 3.2, DRF, simplejwt, Celery 5.2.7; on
  Python 3.8 when one is found) and the client installed from client/, a Django project
  shaped like the backend (tests/support/djangoapp.py), on the backend's real MariaDB tables
  plus `db upgrade`: the corrections snippet runs as written (its link edits and its request),
  and the progress view and "sort again" view run as written, routed by the docs' URL line,
  behind the backend's JWT authentication and group permission.

Not covered: the settings snippet (it reads the backend's `env`), and the three upload /
delete / purge snippets, whose bodies are the backend's own code (`...`); their
`request_trip` calls are the ones run here.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

import aftertrip_client
from tests.plugins.databases import (
    backend_pins,
    fresh_database,
    load_webapp_schema,
    require_webapp_schema,
)
from tests.support.djangoapp import write_project
from tests.support.files import ROOT, client_build_lock
from tests.support.services import free_port

DOCS = [ROOT / "docs" / "backend.md", ROOT / "docs" / "corrections.md"]
PY38_CANDIDATES = [
    "python3.8",
    *sorted(str(p) for p in Path("/root/.pyenv/versions").glob("3.8*/bin/python3.8")),
]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line, code) of each ```python block of a Markdown file."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M):
        line = path.read_text()[: match.start()].count("\n") + 1
        blocks.append((line, match.group(1)))
    return blocks


def all_blocks() -> list[tuple[str, str]]:
    return [(f"{p.name}:{line}", code) for p in DOCS for line, code in python_blocks(p)]


def find_python38() -> str | None:
    """A Python 3.8 interpreter, if this machine has one."""
    for candidate in PY38_CANDIDATES:
        exe = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if exe is None:
            continue
        done = subprocess.run(
            [exe, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode == 0 and done.stdout.strip() == "True":
            return exe
    return None


def test_the_docs_have_the_snippets_this_module_runs() -> None:
    codes = [code for _name, code in all_blocks()]
    assert any("class PhotoFaceStateView" in code for code in codes)
    assert any("photo.tag_face.remove(mina)" in code for code in codes)


def test_doc_snippets_are_python_3_8() -> None:
    blocks = all_blocks()
    python38 = find_python38()
    if python38 is None:  # the grammar check Python itself offers
        for name, code in blocks:
            ast.parse(code, filename=name, feature_version=(3, 8))
        return
    check = (
        "import json, sys\n"
        "for name, code in json.load(sys.stdin):\n"
        "    compile(code, name, 'exec')\n"
    )
    done = subprocess.run(
        [python38, "-c", check],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_doc_snippets_import_what_the_client_exports() -> None:
    for name, code in all_blocks():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module == "aftertrip_client":
                for alias in node.names:
                    assert alias.name in aftertrip_client.__all__, (name, alias.name)


# ---------------------------------------------------------------------------- run them


@pytest.fixture(scope="module")
def backend_python() -> Path:
    """A virtualenv with the backend's pins (celery and redis switched on) and the client
    from client/, on Python 3.8 where there is one."""
    pins = backend_pins()
    base = find_python38() or sys.executable
    key = hashlib.sha256((pins + base).encode()).hexdigest()[:12]
    venv = ROOT / ".cache" / f"docs-backend-venv-{key}"
    python = venv / "bin" / "python"
    stamp = venv / ".pins-installed"
    if not stamp.exists():
        subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        (venv / "requirements.txt").write_text(pins)
        _pip(python, "-r", str(venv / "requirements.txt"))
        stamp.touch()
    with client_build_lock():
        _pip(python, "--force-reinstall", "--no-deps", str(ROOT / "client"))
    return python


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def block_with(marker: str) -> str:
    (code,) = [code for _name, code in all_blocks() if marker in code]
    return code


# Run in the backend virtualenv: the corrections snippet with the objects it names, then the
# views through Django's test client with a real JWT.
SCRIPT = """
import datetime, json, os, sys, uuid
import django
django.setup()
from django.db import connection
from django.test import Client
from rest_framework_simplejwt.tokens import RefreshToken
from accounts.models import Group, User, UserGroup
from photos.models import Photo, TagFace
from trips.models import Trip

def requests(trip):
    with connection.cursor() as cursor:
        cursor.execute("SELECT mode FROM aftertrip_request WHERE trip_id = %s ORDER BY id",
                       [trip.id])
        return [row[0] for row in cursor.fetchall()]

member = User.objects.create(id="mina01", name="Mina", email="mina@example.com")
friends, others = Group.objects.create(name="friends"), Group.objects.create(name="others")
UserGroup.objects.create(user=member, group=friends, is_confirmed=True)
day = datetime.date(2024, 5, 1)
trip = Trip.objects.create(group=friends, place="Jeju", departing_date=day, arriving_date=day)
not_ours = Trip.objects.create(group=others, place="Busan", departing_date=day,
                               arriving_date=day)
mina = TagFace.objects.create(tag_num=0, custom_name="Mina")
kyo = TagFace.objects.create(tag_num=1, custom_name="Kyo")
twin = TagFace.objects.create(tag_num=2, custom_name="")
photo = Photo.objects.create(trip=trip, file_key=uuid.uuid4().hex, file_name="a.jpg", url="")
second = Photo.objects.create(trip=trip, file_key=uuid.uuid4().hex, file_name="b.jpg", url="")
photo.tag_face.add(kyo)
second.tag_face.add(twin)

exec(compile(open(sys.argv[1]).read(), "corrections.md", "exec"),
     {"photo": photo, "mina": mina, "kyo": kyo, "twin": twin, "trip": trip, "Photo": Photo})
out = {
    "links": sorted([p.file_name, t.custom_name] for p in (photo, second)
                    for t in p.tag_face.all()),
    "twin_left": TagFace.objects.filter(id=twin.id).exists(),
    "after_corrections": requests(trip),
}
client = Client()
url = "/photos/face/%d/state/" % trip.id
out["anonymous"] = client.get(url).status_code
auth = {"HTTP_AUTHORIZATION": "Bearer %s" % RefreshToken.for_user(member).access_token}
answer = client.get(url, **auth)
out["member"] = [answer.status_code, answer.json()]
out["not_our_trip"] = client.get("/photos/face/%d/state/" % not_ours.id, **auth).status_code
out["sort_again"] = client.post("/photos/face/%d/" % trip.id, **auth).status_code
out["after_sort_again"] = requests(trip)
print(json.dumps(out))
"""


@pytest.mark.services
@pytest.mark.timeout(1200)
def test_backend_snippets_run_in_a_django_project(backend_python: Path, tmp_path: Path) -> None:
    dump = require_webapp_schema("mariadb")
    views = block_with("class PhotoFaceStateView")
    (url_line,) = re.findall(r"path\('face/<int:trip>/state/'.*\),", views)
    corrections = block_with("photo.tag_face.remove(mina)")
    project = tmp_path / "backend"
    write_project(
        project,
        views=views,
        url_lines=[url_line, "path('face/<int:trip>/', photo_views.PhotoFaceView.as_view()),"],
    )
    (project / "corrections_snippet.py").write_text(corrections)
    with fresh_database("mariadb", tmp_path) as db_url:
        load_webapp_schema(db_url, dump)
        from db.session import upgrade

        upgrade(db_url)
        parsed = make_url(db_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
        env.pop("PYTHONPATH", None)  # the installed client, never this repository's
        env.update(
            PYTHONPATH=str(project),
            DJANGO_SETTINGS_MODULE="demo_settings",
            DB_NAME=str(parsed.database),
            DB_PORT=str(parsed.port or 3306),
            BROKER=f"redis://127.0.0.1:{free_port()}/0",  # nobody there: nudges give up
        )
        done = subprocess.run(
            [str(backend_python), "-c", SCRIPT, str(project / "corrections_snippet.py")],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    # The corrections: a.jpg moved from Kyo to Mina, b.jpg merged from the twin into Mina.
    assert out["links"] == [["a.jpg", "Mina"], ["b.jpg", "Mina"]]
    assert out["twin_left"] is False
    assert out["after_corrections"] == ["missing"]  # asked, though no broker answered
    # The progress view: authenticated, the trip's group only, the state per trip.
    assert out["anonymous"] == 401
    status, body = out["member"]
    assert status == 200 and body["data"]["state"] == "queued", body
    assert body["data"]["busy"] is True and body["data"]["trip_id"] > 0
    assert out["not_our_trip"] == 403
    assert out["sort_again"] == 202
    assert out["after_sort_again"] == ["missing", "all"]
