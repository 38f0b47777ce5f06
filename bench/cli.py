"""`aftertrip-faces bench`: the benchmarks' subcommand, registered by this distribution's
entry point (`aftertrip_faces.commands`, see bench/pyproject.toml), so that the worker's
command line never imports the benchmarks and its image need not ship them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tasks.cli import add_pipeline_options, pipeline_settings
from tasks.console import console


def register(subparsers: Any) -> None:
    """Add `bench` to the `aftertrip-faces` parser."""
    bench = subparsers.add_parser("bench", help="benchmarks over ../shared/data")
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
    bench.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="groupshots: times each pipeline analyses the canvases, taking turns (best time)",
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
    add_pipeline_options(bench)
    bench.set_defaults(handler=cmd_bench)


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

    return run_bench(args, pipeline_settings(args), console)
