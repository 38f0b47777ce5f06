"""The worker service's subcommands of `aftertrip-faces`: rerun, status, db, worker, flower.

`tasks.cli` calls `register(subparsers)`; each handler is `cmd_x(args) -> int` and prints
through the CLI's one console. Imports are kept inside the handlers so that `--help` and
the embedded commands never pay for Celery, SQLAlchemy or the models.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from tasks.settings import ServiceSettings

POLL_SECONDS = 0.5


def _console() -> Console:
    from tasks.console import console

    return console


def _escape(value: object) -> str:
    """A user-controlled value to put inside a markup string (names, paths, errors)."""
    from rich.markup import escape

    return escape(str(value))


def _plain(value: object) -> Any:
    """A user-controlled value as a table cell or a line of its own: never read as markup."""
    from tasks.console import plain

    return plain(value)


def _settings() -> ServiceSettings:
    from tasks.settings import get_settings

    return get_settings()


def trip_id_arg(text: str) -> int:
    """--trip's value: a trips_trip.id (1 to 2**63-1), refused before the database is asked."""
    from tasks.names import trip_id_problem

    try:
        trip_id = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a trip id: {text!r}") from None
    problem = trip_id_problem(trip_id)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return trip_id


def register(subparsers: Any) -> None:
    """Add the service's subcommands to the `aftertrip-faces` parser."""
    rerun = subparsers.add_parser(
        "rerun", help="queue a grouping job for a trip on the worker service"
    )
    rerun.add_argument(
        "--trip", type=trip_id_arg, required=True, metavar="ID", help="trips_trip.id"
    )
    rerun.add_argument(
        "--all",
        action="store_true",
        help="analyse every photo again (default: only new photos and those that failed)",
    )
    rerun.add_argument(
        "--forget-corrections",
        action="store_true",
        help="first forget the trip's corrections (links people added or removed in the web "
        "app): the job then writes the worker's own grouping over them",
    )
    rerun.add_argument("--wait", action="store_true", help="show the job's progress until it ends")
    rerun.add_argument(
        "--timeout", type=float, default=None, help="with --wait: give up waiting after SECONDS"
    )
    rerun.add_argument(
        "--inline",
        action="store_true",
        help="run the job in this process, without broker or worker (the embedded default: "
        "e.g. SQLite and AFTERTRIP_PHOTO_ROOT); takes no per-trip lock",
    )
    rerun.set_defaults(handler=cmd_rerun)

    imp = subparsers.add_parser(
        "import-trip",
        help="development: make a trip from a folder of photos (rows + uploads), print its id",
    )
    imp.add_argument("folder", help="a folder of photos")
    imp.add_argument("--place", default="Demo trip", help="trips_trip.place")
    imp.add_argument(
        "--allow-webapp-data",
        action="store_true",
        help="import into a database that holds web-app data import-trip did not make",
    )
    imp.set_defaults(handler=cmd_import_trip)

    status = subparsers.add_parser("status", help="a trip's recent jobs, counts and photo errors")
    status.add_argument(
        "--trip", type=trip_id_arg, required=True, metavar="ID", help="trips_trip.id"
    )
    status.add_argument("--limit", type=int, default=5, help="how many recent jobs to show")
    status.set_defaults(handler=cmd_status)

    db = subparsers.add_parser("db", help="the worker's database tables")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade = db_commands.add_parser(
        "upgrade", help="apply the worker's migrations to AFTERTRIP_DATABASE_URL"
    )
    upgrade.add_argument("--revision", default="head", help="Alembic revision (default: head)")
    upgrade.add_argument(
        "--with-webapp-tables",
        action="store_true",
        help="development only: also create the web app's tables (a stack without Django)",
    )
    upgrade.set_defaults(handler=cmd_db_upgrade)

    worker = subparsers.add_parser(
        "worker", help="run a Celery worker on the faces queue (celery -A tasks.app worker)"
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="worker processes (default AFTERTRIP_WORKER_CONCURRENCY; 1 per GPU)",
    )
    worker.add_argument("--hostname", default=None, help="node name, e.g. gpu0@%%h")
    worker.add_argument("--loglevel", default="INFO", help="Celery log level")
    worker.set_defaults(handler=cmd_worker)

    flower = subparsers.add_parser(
        "flower", help="run Flower (needs AFTERTRIP_FLOWER_BASIC_AUTH=user:password)"
    )
    flower.set_defaults(handler=cmd_flower)


# ---------------------------------------------------------------------------- rerun


def cmd_rerun(args: argparse.Namespace) -> int:
    """Queue `aftertrip.group_trip` for a trip; with --wait, follow its PROGRESS."""
    if args.forget_corrections and _forget_corrections(args.trip) != 0:
        return 1
    if args.inline:
        return _run_inline(args)
    from tasks.client import enqueue_trip

    console = _console()
    result = enqueue_trip(args.trip, mode="all" if args.all else "missing")
    console.print(f"queued job {result.id} for trip {args.trip}")
    if not args.wait:
        return 0
    try:
        return _follow(result, args.timeout, console)
    except KeyboardInterrupt:
        console.print(f"still queued or running: `aftertrip-faces status --trip {args.trip}`")
        return 130


def _forget_corrections(trip_id: int) -> int:
    from db.common import TripNotFound
    from db.trips import forget_corrections
    from tasks.compose import Services

    console = _console()
    services = Services(_settings())
    try:
        with services.sessions() as session:
            forgotten = forget_corrections(session=session, trip_id=trip_id)
    except TripNotFound as exc:
        console.print(f"[red]error:[/red] {_escape(exc)}")
        return 1
    finally:
        services.close()
    console.print(
        f"forgot {forgotten} correction(s) of trip {trip_id}: "
        "the next job writes the worker's own grouping"
    )
    return 0


def _run_inline(args: argparse.Namespace) -> int:
    """The job body of `aftertrip.group_trip`, run here with a progress bar."""
    from rich.progress import Progress

    from tasks.compose import Services
    from tasks.job import run_trip_job

    console = _console()
    services = Services(_settings())
    settings = services.settings
    store = services.store  # a missing store fails here, before any database work
    guard = services.guard()
    try:
        _check_database(services)
        with Progress(console=console) as progress:
            bar = progress.add_task(f"trip {args.trip}", total=None)
            summary = run_trip_job(
                sessions=services.sessions,
                guard=guard,
                store=store,
                pipeline=services.pipeline,
                settings=settings,
                trip_id=args.trip,
                mode="all" if args.all else "missing",
                thumbnail_prefix=settings.s3_thumbnail_prefix,
                on_progress=lambda stage, done, total: progress.update(
                    bar, description=stage, completed=done, total=total or None
                ),
            )
    finally:
        services.close()
    console.print(summary)
    return 0


def _check_database(services: Any) -> None:
    """Read the worker's job table once: a database that cannot be used (`tasks.cli.main`
    says why in two lines) fails here, before a progress bar is drawn."""
    from sqlalchemy import select

    from db.models import Job

    with services.sessions() as session:
        session.execute(select(Job.id).limit(1))


def _follow(result: Any, timeout: float | None, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tasks.names import PROGRESS

    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        bar = progress.add_task("queued", total=None)
        while not result.ready():
            if deadline is not None and time.monotonic() > deadline:
                console.print(f"[yellow]gave up waiting; job {result.id} goes on[/yellow]")
                return 1
            if result.state == PROGRESS and isinstance(result.info, dict):
                meta = result.info
                total = int(meta.get("total") or 0)
                progress.update(
                    bar,
                    description=str(meta.get("stage", "running")),
                    total=total or None,
                    completed=int(meta.get("done") or 0),
                )
            elif result.state == "STARTED":
                progress.update(bar, description="started")
            time.sleep(POLL_SECONDS)
    if result.successful():
        counts = result.result or {}
        summary = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("trip_id",))
        console.print(f"[green]done[/green]: {_escape(summary)}")
        return 0
    console.print(f"[red]job {_escape(result.id)} failed[/red]: {_escape(repr(result.result))}")
    return 1


# ---------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    """Print a trip's recent jobs, photo and face counts, and the photos that failed."""
    from zoneinfo import ZoneInfo

    from rich.table import Table
    from rich.text import Text

    from db.common import TripNotFound
    from db.jobs import job_last_stored, job_stored_photos, mark_stalled_jobs
    from db.status import trip_folders, trip_status
    from db.types import local_time, utcnow
    from tasks.compose import Services
    from tasks.statusview import Running, job_lines

    console = _console()
    services = Services(_settings())
    settings = services.settings
    zone = ZoneInfo(settings.webapp_time_zone)
    try:
        with services.sessions() as session:
            # A `running` row whose worker stopped beating is failed, not pending, from now on.
            mark_stalled_jobs(
                session=session, stall_seconds=settings.stall_seconds, trip_id=args.trip
            )
            status = trip_status(session=session, trip_id=args.trip, limit=args.limit)
            # A running job's progress, over its deliveries and chunks: the photos it stored
            # and when it stored the last (a stuck job beats but stores nothing).
            running = {
                job.id: Running(
                    stored=len(
                        job_stored_photos(
                            session=session,
                            job_id=job.id,
                            embedder_sha256=status.embedder_sha256 or "",
                        )
                    ),
                    last_stored=job_last_stored(session=session, job_id=job.id),
                )
                for job in status.jobs
                if job.status == "running"
            }
            folders = trip_folders(session=session, trip_id=args.trip)
    except TripNotFound as exc:
        console.print(f"[red]error:[/red] {_escape(exc)}")
        return 1
    finally:
        services.close()

    now = utcnow()
    console.print(
        f"trip {status.trip_id}: {status.photos} photos, {status.analyzed} analysed, "
        f"{status.faces} faces, {status.people} people (times in {settings.webapp_time_zone})"
    )
    console.print(f"[bold]recent jobs[/bold] (newest first, {len(status.jobs)})")
    for job in status.jobs:
        job_text = job_lines(
            job, zone=zone, now=now, running=running.get(job.id), width=max(60, console.width)
        )
        for line in job_text:
            console.print(_plain(line))
    table = Table(title="folders (photos_tagface)")
    for column in ("tag id", "tag_num", "name", "photos"):
        table.add_column(column)
    for folder in folders:
        shown = ", ".join(folder.photo_files[:5])
        more = f" … +{len(folder.photo_files) - 5}" if len(folder.photo_files) > 5 else ""
        table.add_row(
            str(folder.tag_id),
            str(folder.tag_num),
            _plain(folder.name),
            _plain(f"{len(folder.photo_files)}: {shown}{more}"),
        )
    console.print(table)
    if status.corrections:
        corrections = Table(title="corrections in force (links people changed)")
        for column in ("kind", "photo", "file", "folder", "since job", "noticed"):
            corrections.add_column(column)
        for c in status.corrections:
            where = f"{c.tag_id} {c.folder_name}".strip()
            kind = c.kind if c.active else f"{c.kind} (photo deleted: blocks nothing)"
            # Names are the users' own: printed as text, never as markup.
            corrections.add_row(
                kind,
                str(c.photo_id),
                Text(c.file_name),
                Text(where),
                str(c.job_id) if c.job_id is not None else "-",
                local_time(c.noticed_at, zone),
            )
        console.print(corrections)
    if status.errors:
        errors = Table(title="photos that failed")
        for column in ("photo", "file", "status", "error"):
            errors.add_column(column)
        for problem in status.errors:
            errors.add_row(
                str(problem.photo_id),
                _plain(problem.file_name),
                problem.status,
                _plain(problem.error or ""),
            )
        console.print(errors)
    return 0


# ---------------------------------------------------------------------------- db


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply the worker's Alembic migrations (its aftertrip_* tables only)."""
    from sqlalchemy.engine import make_url

    from db.session import current_revision, upgrade

    console = _console()
    settings = _settings()
    url = settings.database_url
    if args.with_webapp_tables:
        if settings.environment == "production":
            console.print(
                "[red]error:[/red] --with-webapp-tables is for development stacks only: "
                "in production the web app's migrations create its tables"
            )
            return 2
        from db.webapp import create_webapp_tables

        engine = settings.database_engine()
        try:
            create_webapp_tables(engine)
        finally:
            engine.dispose()
    from rich.markup import escape

    from db.webapp import SharedFoldersError

    try:
        created = upgrade(url, args.revision)
    except SharedFoldersError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    where = make_url(url).render_as_string(hide_password=True)
    console.print(_plain(f"database {where} at revision {current_revision(url)}"))
    if created:
        console.print(f"shared folders created: ids {', '.join(map(str, created))}")
    return 0


def cmd_import_trip(args: argparse.Namespace) -> int:
    """Create a trip whose photos are a folder's, as the web app would (development only)."""
    import uuid
    from pathlib import Path

    from db.webapp import (
        IMPORTED_URL_PREFIX,
        Photo,
        Trip,
        foreign_webapp_data,
        import_group_id,
    )
    from storage.local import LocalStore
    from tasks.compose import Services
    from worker.errors import PhotoError

    console = _console()
    settings = _settings()
    if settings.environment == "production":
        console.print("[red]error:[/red] import-trip is for development stacks only")
        return 2
    folder = Path(args.folder)
    if not folder.is_dir():
        console.print(f"[red]error:[/red] {_escape(folder)} is not a folder")
        return 2
    # Read through a store that opens nothing outside the folder, not even through a link.
    album = LocalStore(folder, follow_links=False)
    names = [
        p.name
        for p in sorted(folder.iterdir())
        if not p.name.startswith(".") and not (p.is_dir() and not p.is_symlink())
    ]
    if not names:  # said before any database or store is opened, as before
        console.print(f"[red]error:[/red] no photos in {_escape(folder)}")
        return 2
    services = Services(settings)
    store = services.store
    imported = 0
    try:
        with services.sessions.begin() as session:
            foreign = None if args.allow_webapp_data else foreign_webapp_data(session=session)
            if foreign:
                console.print(
                    f"[red]error:[/red] import-trip is for development stacks, and {foreign}: "
                    "it would add a trip and photos among the app's own. Pass "
                    "--allow-webapp-data if that is what you want."
                )
                return 2
            trip = Trip(place=args.place, group_id=import_group_id(session=session))
            session.add(trip)
            session.flush()
            for name in names:  # one photo's bytes in memory at a time
                try:
                    data = album.read(name)
                except PhotoError as exc:
                    console.print(_plain(f"skipped {name}: {exc.reason}"))
                    continue
                key = uuid.uuid4()
                store.write(str(key), data, content_type="image/jpeg")
                url = f"{IMPORTED_URL_PREFIX}{key}"
                session.add(Photo(trip_id=trip.id, file_key=key, file_name=name, url=url))
                imported += 1
            if not imported:
                raise _NothingToImport  # rolls the trip back
            trip_id = trip.id
    except _NothingToImport:
        console.print(f"[red]error:[/red] no photos in {_escape(folder)}")
        return 2
    finally:
        services.close()
    console.print(_plain(f"trip {trip_id}: {imported} photos from {folder}"))
    return 0


class _NothingToImport(Exception):
    """No file of the folder could be read as a photo: the trip is not created."""


# ---------------------------------------------------------------------------- processes


def worker_argv(settings: ServiceSettings, args: argparse.Namespace) -> list[str]:
    """The `celery worker` command line for the faces queue."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "worker",
        "-Q",
        settings.queue,
        "--pool",
        "prefork",
        "--concurrency",
        str(args.concurrency or settings.worker_concurrency),
        "--loglevel",
        args.loglevel,
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    """Replace this process with a Celery worker (signals then reach Celery directly)."""
    argv = worker_argv(_settings(), args)
    _console().print(_plain(" ".join(argv[1:])))
    os.execv(argv[0], argv)
    return 0  # pragma: no cover - execv does not return


def flower_command(settings: ServiceSettings) -> tuple[list[str], dict[str, str]] | None:
    """Flower's command line and environment, or None when no usable basic auth is configured
    (none, or an entry with an empty user or password).

    The credentials go through Flower's FLOWER_BASIC_AUTH variable, not the command line,
    where every user of the machine could read them in `ps`. `-A tasks.trip` loads the app
    with the task registered, which Flower's `/api/task/async-apply/` needs. Address, port and
    login follow the rule `celery -A tasks flower` follows too (`tasks.flowerauth.
    flower_environment`: an AfterTrip setting that is set, else Flower's own variable).
    """
    from tasks.flowerauth import flower_environment
    from tasks.settings import flower_auth_problems

    auth = settings.flower_basic_auth
    if auth is None or not auth.get_secret_value() or flower_auth_problems(auth):
        return None
    given = settings.model_fields_set
    env = flower_environment(
        os.environ,
        basic_auth=auth.get_secret_value(),
        address=settings.flower_address if "flower_address" in given else None,
        port=settings.flower_port if "flower_port" in given else None,
    )
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.trip",
        "flower",
        f"--address={env['FLOWER_ADDRESS']}",
        f"--port={env['FLOWER_PORT']}",
    ]
    return argv, env


def cmd_flower(args: argparse.Namespace) -> int:
    """Replace this process with Flower, only with basic auth configured."""
    from tasks.settings import flower_auth_problems

    settings = _settings()
    command = flower_command(settings)
    if command is None:
        auth = settings.flower_basic_auth
        why = "; ".join(flower_auth_problems(auth)) if auth and auth.get_secret_value() else ""
        _console().print(
            "[red]error:[/red] Flower can run tasks from its web API, so it never starts "
            "without a login: set AFTERTRIP_FLOWER_BASIC_AUTH=user:password"
            + (f" ({_escape(why)})" if why else "")
        )
        return 2
    argv, env = command
    os.execve(argv[0], argv, env)
    return 0  # pragma: no cover - execve does not return
