"""How `aftertrip-faces status` words a job: one or two short lines each, times in the web
app's zone with its name, and a running job that stores nothing marked.

Plain functions over `db.schemas.JobView`, so the wording is one place; `tasks.admin` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from db.schemas import JobView
from db.types import local_time

QUIET_SECONDS = 300.0
"""A running job with a fresh heartbeat that has stored no photo for this long is marked:
it stores one every few seconds when it is merely slow (photos are stored 16 at a time;
the models load within a minute), so a quiet five minutes means it is stuck on something
(a connection, a read) while its heartbeat thread goes on."""


def ago(seconds: float) -> str:
    """A duration as people say it: "40 s", "3 min", "2 h 5 min"."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


@dataclass
class Running:
    """What `status` knows of a running job beyond its row: photos stored, when the last was."""

    stored: int
    last_stored: datetime | None


def job_lines(
    job: JobView, *, zone: tzinfo, now: datetime, running: Running | None = None, width: int = 100
) -> list[str]:
    """A job in lines of at most `width`: two, three where the counts or an error need it or
    a running job is stuck."""
    head = f"job {job.id}  {job.mode:<7}  {job.status:<9}  attempt {job.attempts}"
    head += f"  started {local_time(job.started_at or job.created_at, zone)}"
    if job.finished_at is not None and job.started_at is not None:
        head += f"  took {ago((job.finished_at - job.started_at).total_seconds())}"
    lines = [head]
    if running is not None:
        lines.extend(_running_lines(job, running, zone, now))
    elif job.status == "succeeded" and job.counts:
        lines.extend(wrap_parts(counts_parts(job.counts), width))
    elif job.error:
        lines.append("  " + _shorten(job.error, 2 * width - 6))
    return lines


def counts_parts(counts: dict[str, Any]) -> list[str]:
    """A finished job's counts in a few short phrases, instead of nineteen `name value` pairs."""
    c = {key: int(value) for key, value in counts.items() if isinstance(value, int)}
    parts = [
        f"{c.get('analyzed', 0)}/{c.get('photos', 0)} analysed, {c.get('faces', 0)} faces",
        f"{c.get('people', 0)} people, {c.get('others', 0)} others, {c.get('no_face', 0)} no face, "
        f"{c.get('errors', 0)} errors",
        f"links +{c.get('links_added', 0)} -{c.get('links_removed', 0)}, "
        f"folders +{c.get('tags_created', 0)} -{c.get('tags_deleted', 0)}",
    ]
    if c.get("corrections"):
        parts.append(
            f"corrections {c['corrections']} ({c.get('corrections_noticed', 0)} new, "
            f"{c.get('corrections_honoured', 0)} honoured)"
        )
    return parts


def wrap_parts(parts: list[str], width: int, indent: str = "  ") -> list[str]:
    """`parts` joined with "; " into lines of at most `width`, broken only between parts."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += "; " + part
        else:
            lines.append(indent + part)
    return lines


def _running_lines(job: JobView, running: Running, zone: tzinfo, now: datetime) -> list[str]:
    beat = job.heartbeat_at
    since_beat = f"heartbeat {ago((now - beat).total_seconds())} ago" if beat else "no heartbeat"
    if running.last_stored is not None:
        last = running.last_stored
        progress = (
            f"last stored {local_time(last, zone, date=False)} "
            f"({ago((now - last).total_seconds())} ago)"
        )
    else:
        last = job.started_at or job.created_at
        progress = "none stored yet"
    lines = [f"  {running.stored} photos stored so far; {progress}; {since_beat}"]
    quiet = (now - last).total_seconds()
    if beat is not None and quiet > QUIET_SECONDS:
        lines.append(
            f"  STUCK? heartbeat fresh but nothing stored for {ago(quiet)} "
            "(a slow job stores every few s)"
        )
    return lines


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
