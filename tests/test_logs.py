"""Log lines carry the structured fields (`extra=`): key=value by default, or JSON."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.logs import JsonFormatter, KeyValueFormatter, extra_fields, reformat_handlers
from tests.support.files import ROOT


def record(message: str = "job succeeded", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("db.jobs", logging.INFO, __file__, 1, message, (), None)
    rec.__dict__.update(extra)
    return rec


def test_key_value_lines_carry_the_extra_fields() -> None:
    rec = record(trip_id=7, job_id=12, mode="all", folder="faces/7/", seconds=1.5)
    assert extra_fields(rec) == {
        "trip_id": 7,
        "job_id": 12,
        "mode": "all",
        "folder": "faces/7/",
        "seconds": 1.5,
    }
    line = KeyValueFormatter().format(rec)
    assert line.endswith(
        "INFO db.jobs: job succeeded trip_id=7 job_id=12 mode=all folder=faces/7/ seconds=1.5"
    )
    # values a reader could not split are quoted; lists and dicts as JSON
    line = KeyValueFormatter().format(record(place="Jeju island", tag_ids=[1, 2], empty=""))
    assert 'place="Jeju island" tag_ids="[1, 2]" empty=""' in line


def test_key_value_fields_stay_on_the_first_line_of_a_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    rec.__dict__["job_id"] = 3
    first, *rest = KeyValueFormatter().format(rec).splitlines()
    assert first.endswith("failed job_id=3") and rest[0].startswith("Traceback")


def test_json_lines() -> None:
    rec = record(trip_id=7, job_id=12, timings={"decode": 0.25}, thing=object())
    entry = json.loads(JsonFormatter().format(rec))
    assert entry["message"] == "job succeeded" and entry["level"] == "INFO"
    assert entry["logger"] == "db.jobs"
    assert entry["trip_id"] == 7 and entry["job_id"] == 12
    assert entry["timings"] == {"decode": 0.25}
    assert entry["thing"].startswith("<object")  # what JSON cannot hold, as text


def test_celery_formatters_are_wrapped_not_replaced() -> None:
    from celery.app.log import TaskFormatter

    logger = logging.getLogger("test-celery-wrap")
    handler = logging.StreamHandler()
    handler.setFormatter(TaskFormatter("[%(levelname)s/%(task_name)s] %(message)s"))
    logger.addHandler(handler)
    try:
        reformat_handlers(logger, "text")
        reformat_handlers(logger, "text")  # twice (both signals) wraps once
        formatter = handler.formatter
        assert isinstance(formatter, KeyValueFormatter)
        assert isinstance(formatter.inner, TaskFormatter)
        assert formatter.format(record(trip_id=5)) == "[INFO/???] job succeeded trip_id=5"
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_cli_log_lines_carry_the_fields(tmp_path: Path, log_format: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AFTERTRIP_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "AFTERTRIP_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "AFTERTRIP_LOG_FORMAT": log_format,
        }
    )
    run = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "-v", "db", "upgrade", "--with-webapp-tables"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "migrations applied" in line]
    assert lines, run.stderr
    if log_format == "json":
        entry = json.loads(lines[0])
        assert entry["message"] == "migrations applied"
        assert entry["url"] == f"sqlite:///{tmp_path / 'db.sqlite3'}"
    else:
        assert lines[0].endswith(f"migrations applied url=sqlite:///{tmp_path / 'db.sqlite3'}")
