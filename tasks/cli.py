"""`aftertrip-faces`: group a folder or S3 prefix of photos, benchmark, run the service.

All terminal output goes through `console` here; library code only logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from storage import PhotoStore

console = Console()
logger = logging.getLogger("aftertrip")


def plain(value: object) -> Text:
    """A user-controlled string (a name, a path, an error) as text: never read as Rich markup.

    A folder named `[/bold] Mina` is shown as it is; as markup it would end the command with
    a MarkupError. Table cells take it as it is; inside markup, use `escape()` instead.
    """
    return Text(str(value))


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--detector", choices=["mtcnn", "scrfd"], help="face detector (AFTERTRIP_DETECTOR)"
    )
    parser.add_argument(
        "--grouping", choices=["default", "seed"], help="grouping method (AFTERTRIP_GROUPING)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help="cosine similarity threshold (AFTERTRIP_SIMILARITY_THRESHOLD); "
        "default: the value calibrated for the embedder",
    )


def _settings(args: argparse.Namespace):  # noqa: ANN202 - PipelineSettings, imported lazily
    from worker.settings import PipelineSettings

    overrides = {
        key: value
        for key, value in {
            "detector": getattr(args, "detector", None),
            "grouping": getattr(args, "grouping", None),
            "similarity_threshold": getattr(args, "threshold", None),
        }.items()
        if value is not None
    }
    return PipelineSettings(**overrides)


def _open_album(path: str) -> tuple[PhotoStore, list[str]]:
    """The store and photo keys behind a folder path or an s3://bucket/prefix URI."""
    from storage import LocalStore, S3Store, parse_s3_uri

    if path.startswith("s3://"):
        bucket, prefix = parse_s3_uri(path)
        s3 = S3Store(bucket, endpoint_url=os.environ.get("AFTERTRIP_S3_ENDPOINT_URL") or None)
        return s3, [k for k in s3.list(prefix) if not k.endswith("/")]
    root = Path(path)
    if not root.is_dir():
        raise SystemExit(f"error: {path} is not a folder (or an s3://bucket/prefix URI)")
    # A local album is the user's own files: links to photos kept elsewhere are followed.
    local = LocalStore(root, follow_links=True)
    visible = [k for k in local.list("") if not any(p.startswith(".") for p in k.split("/"))]
    return local, visible


def cmd_group(args: argparse.Namespace) -> int:
    """Group the photos of a folder or S3 prefix; write result.json and report.html."""
    from storage import photo_sources, s3_fetch
    from worker.pipeline import AnalyzedPhoto, FacePipeline, group_album
    from worker.report import album_json, render_html
    from worker.types import PhotoStatus

    settings = _settings(args)
    store, keys = _open_album(args.path)
    if not keys:
        console.print(f"[yellow]no photos found in {escape(args.path)}[/yellow]")
    out: Path = args.out
    (out / "faces").mkdir(parents=True, exist_ok=True)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    base = args.path.rstrip("/")
    sources = photo_sources(store, keys, names=[f"{base}/{k}" for k in keys])
    face_images: dict[int, str] = {}
    photo_images: dict[str, str] = {}
    next_face = 0

    def save_thumbnails(photo: AnalyzedPhoto) -> None:
        nonlocal next_face
        for thumb in photo.thumbnails:
            rel = f"faces/{next_face}.jpg"
            (out / rel).write_bytes(thumb)
            face_images[next_face] = rel
            next_face += 1
        if photo.preview is not None:
            rel = f"photos/{len(photo_images)}.jpg"
            (out / rel).write_bytes(photo.preview)
            photo_images[photo.photo_id] = rel

    pipeline = FacePipeline(settings, fetch=s3_fetch)
    with _progress(args.quiet) as progress:
        task = progress.add_task("photos", total=len(sources))
        result = group_album(
            sources,
            settings,
            pipeline=pipeline,
            on_photo=save_thumbnails,
            previews=True,
            on_progress=lambda stage, done, total: (
                progress.update(task, completed=done)
                if stage == "analyze"
                else progress.update(task, description="grouped")
            ),
        )
    (out / "result.json").write_text(json.dumps(album_json(result), indent=1))
    title = f"AfterTrip Faces — {args.path}"
    (out / "report.html").write_text(
        render_html(result, face_images=face_images, photo_images=photo_images, title=title)
    )
    _print_summary(result)
    console.print(plain(f"report: {(out / 'report.html').resolve()}"))
    console.print(plain(f"result: {(out / 'result.json').resolve()}"))
    if result.photos and not any(photo.status is PhotoStatus.OK for photo in result.photos):
        console.print(
            f"[red]error:[/red] none of the {len(result.photos)} files in {escape(args.path)} "
            "could be read as a photo: see the errors above"
        )
        return 1
    if not result.photos:
        return 1
    return 0


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


def _print_summary(result) -> None:  # noqa: ANN001 - AlbumResult
    from worker.types import NO_FACE_GROUP, SINGLE_FACE_GROUP, PhotoStatus

    failed = [p for p in result.photos if p.status is not PhotoStatus.OK]
    table = Table(title="album summary", show_header=False)
    total = result.timings.get("total", 0.0) or 1e-9
    rows = [
        ("photos", f"{len(result.photos)} ({len(result.photos) - len(failed)} processed)"),
        ("faces", str(len(result.faces))),
        ("people (folders)", str(len(result.groups))),
        ("others (-1) faces", str(sum(f.group == SINGLE_FACE_GROUP for f in result.faces))),
        ("no-face (-2) photos", str(sum(p.group_idx == [NO_FACE_GROUP] for p in result.photos))),
        ("errors", str(len(failed))),
        ("time", f"{total:.1f} s ({len(result.photos) / total:.2f} photos/s)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    people = Table(title="people")
    for col in ("folder", "photos", "faces", "photo names"):
        people.add_column(col)
    names = {p.id: p.path.rsplit("/", 1)[-1] for p in result.photos}
    for group in result.groups:
        shown = ", ".join(names[pid] for pid in group.photo_ids[:6])
        more = f" … +{len(group.photo_ids) - 6}" if len(group.photo_ids) > 6 else ""
        people.add_row(
            str(group.idx), str(len(group.photo_ids)), str(len(group.face_ids)), plain(shown + more)
        )
    console.print(people)
    for photo in failed:
        console.print(
            f"[red]{photo.status.value}[/red] {escape(photo.path)}: {escape(str(photo.error))}"
        )


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo album from photos a dependency ships, then group it."""
    from worker.demo import build_demo_album

    album = args.out / "album"
    build_demo_album(album)
    console.print(
        plain(f"demo album: {album.resolve()} (players.jpg, yaoming.jpg, gdp.jpg, lake.jpg)")
    )
    args.path = str(album)
    args.out = args.out / "report"
    return cmd_group(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the speed/detection benchmarks or the grouping-quality benchmark."""
    if args.what == "scale":
        from bench.scale import run_scale

        result = run_scale(
            args.data,
            sizes=tuple(args.sizes),
            identities=args.identities,
            cache_dir=args.cache,
            out_dir=args.out,
            cached_only=args.cached_only,
            timeout=args.timeout,
        )
        console.print(f"wrote {args.out / 'RESULTS.md'} ({len(result['rows'])} rows)")
        return 0
    from bench.run import run_bench

    return run_bench(args, _settings(args), console)


def cmd_models(args: argparse.Namespace) -> int:
    """List the model registry and check every installed file's sha256."""
    from worker.errors import ModelError
    from worker.models import REGISTRY, resolve_model

    table = Table(title="models")
    for col in ("name", "role", "package", "status", "license"):
        table.add_column(col)
    failures = 0
    for spec in REGISTRY.values():
        try:
            resolve_model(spec.name)
            status = "[green]ok[/green]"
        except ModelError as exc:
            status, failures = f"[red]{escape(str(exc))}[/red]", failures + 1
        table.add_row(spec.name, spec.role, spec.package_version, status, spec.license)
    console.print(table)
    return 1 if failures else 0


def settings_table() -> str:
    """Every AFTERTRIP_* setting as a Markdown table (the README's Settings section)."""
    from tasks.settings import ServiceSettings as Settings

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "~/.cache/aftertrip-faces" if name == "model_cache_dir" else "(computed)"
        else:
            default = "" if field.default is None else str(field.default)
        shown = f"`{default}`" if default else "(empty)"
        lines.append(f"| `AFTERTRIP_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(lines)


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the settings table."""
    console.print(settings_table(), markup=False, highlight=False, soft_wrap=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: group, bench, models, and the service's commands."""
    parser = argparse.ArgumentParser(
        prog="aftertrip-faces",
        description="Sort a trip's photos into one folder per person.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    group = sub.add_parser("group", help="group the photos of a folder or s3://bucket/prefix")
    group.add_argument("path", help="a folder of photos, or s3://bucket/prefix")
    group.add_argument("--out", type=Path, required=True, help="where to write the report")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_pipeline_options(group)
    group.set_defaults(handler=cmd_group)

    demo = sub.add_parser("demo", help="group the embedded demo album (no data needed)")
    demo.add_argument("--out", type=Path, default=Path("demo"), help="where to write it")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_pipeline_options(demo)
    demo.set_defaults(handler=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks over ../shared/data")
    bench.add_argument(
        "what",
        nargs="?",
        default="speed",
        choices=["speed", "detection", "quality", "scale", "groupshots", "all"],
        help="speed + detection + scale + groupshots write bench/RESULTS.md; quality writes "
        "bench/QUALITY.md",
    )
    bench.add_argument("--data", type=Path, default=Path("../shared/data"), help="data folder")
    bench.add_argument("--out", type=Path, default=Path("bench"), help="results folder")
    bench.add_argument("--limit", type=int, default=None, help="photos per set (speed, groupshots)")
    bench.add_argument(
        "--split",
        default="held-out",
        choices=["held-out", "tune"],
        help="groupshots: the held-out photos (idols, five largest g20) or the tuning ones",
    )
    bench.add_argument("--sets", nargs="*", default=None, help="quality: which faces-dev sets")
    bench.add_argument("--albums", type=int, default=20, help="quality: albums per set")
    bench.add_argument("--cache", type=Path, default=None, help="quality: embedding cache")
    bench.add_argument(
        "--compare",
        nargs="*",
        default=[],
        choices=["mtcnn", "scrfd"],
        help="quality: also run the default grouping on these detectors' faces",
    )
    bench.add_argument(
        "--sizes",
        nargs="*",
        type=int,
        default=[1_000, 5_000, 20_000, 50_000, 100_000, 200_000],
        help="scale: numbers of faces",
    )
    bench.add_argument(
        "--identities", type=int, default=None, help="scale: LFW people to build faces from"
    )
    bench.add_argument(
        "--cached-only",
        action="store_true",
        help="scale: only LFW people whose faces are already in the cache",
    )
    bench.add_argument(
        "--timeout", type=float, default=900, help="scale: seconds per size and method"
    )
    _add_pipeline_options(bench)
    bench.set_defaults(handler=cmd_bench)

    models = sub.add_parser("models", help="list models and verify their sha256")
    models.set_defaults(handler=cmd_models)

    settings = sub.add_parser("settings", help="print every AFTERTRIP_* setting (Markdown)")
    settings.set_defaults(handler=cmd_settings)

    try:
        from tasks.admin import register
    except ImportError as exc:  # the service extras are optional for the embedded default
        logger.debug("service commands unavailable: %s", exc)
    else:
        register(sub)
    return parser


def _log_format() -> Literal["text", "json"]:
    """AFTERTRIP_LOG_FORMAT; "text" while the settings do not parse (the command says why)."""
    from pydantic import ValidationError

    from worker.settings import PipelineSettings

    try:
        return PipelineSettings().log_format
    except ValidationError:
        return "text"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `aftertrip-faces` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from tasks.logs import configure_cli_logging

    configure_cli_logging(logging.INFO if args.verbose else logging.WARNING, _log_format())
    start = time.perf_counter()
    from worker.errors import AfterTripError

    try:
        code = int(args.handler(args))
    except AfterTripError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2
    logger.info("done in %.1f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
