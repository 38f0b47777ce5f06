"""`aftertrip-faces bench`: runs the benchmarks and writes bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.env import machine
from bench.speed import speed_benchmark
from worker.settings import PipelineSettings

logger = logging.getLogger(__name__)

SPEED_SETS = ("group-photos/g20", "faces-dev/celeba")
DETECTORS = ("mtcnn", "scrfd")


def _speed_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "Stage seconds are summed per stage over the run: decoding and embedding run on threads "
        "of their own beside detection, so they add up to more than the wall time. The floor is "
        "the same photos' decode, detect and embed, each run alone, one after another.",
        "",
        "| set | detector | photos | faces | photos/s | faces/s | decode s | detect s | "
        "align s | embed s | group s | wall s | floor s (decode+detect+embed) | wall/floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, f = r["stages_s"], r["floor_s"]
        out.append(
            f"| {r['set']} | {r['detector']} | {r['photos']} | {r['faces']} | "
            f"{r['photos_per_s']} | {r['faces_per_s']} | "
            f"{s.get('decode', 0)} | {s.get('detect', 0)} | "
            f"{s.get('align', 0)} | {s.get('embed', 0)} | {s.get('group', 0)} | {r['wall_s']} | "
            f"{f['total']} ({f['decode']}+{f['detect']}+{f['embed']}) | {r['ratio_to_floor']} |"
        )
    return out


def _detection_table(result: dict[str, Any]) -> list[str]:
    out = [
        f"A labelled face counts as found at IoU >= {result.get('match_iou')}.",
        "",
        "| detector | voc-faces found | recall | extra | ms/photo | scenery faces (9 photos) | "
        "g20 faces (first photos) | g20 ms/photo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in result.items():
        if not isinstance(entry, dict):
            continue
        voc, scenery, g20 = entry["voc_faces"], entry["scenery"], entry.get("g20", {})
        out.append(
            f"| {label} | {voc['found']}/{voc['faces']} | {voc['recall']:.3f} | "
            f"{voc['extra']} | {voc['ms_per_image']} | {scenery['faces']} | "
            f"{g20.get('faces', '-')} in {g20.get('images', '-')} | "
            f"{g20.get('ms_per_image', '-')} |"
        )
    return out


def write_results(out_dir: Path, sections: dict[str, Any]) -> Path:
    """Merge new sections into bench/results.json and render bench/RESULTS.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "results.json"
    data: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    if "speed" in sections and "speed" in data:
        # Runs of one detector (or set) replace only their own rows.
        fresh = {(r["set"], r["detector"]) for r in sections["speed"]["rows"]}
        kept = [r for r in data["speed"]["rows"] if (r["set"], r["detector"]) not in fresh]
        sections["speed"]["rows"] = kept + sections["speed"]["rows"]
    data.update(sections)
    store.write_text(json.dumps(data, indent=1))
    lines = ["# Benchmark results", "", "Written by `aftertrip-faces bench` (see README)."]
    for name, section in data.items():
        if name not in ("speed", "detection"):
            continue  # sections of their own, kept between their markers below
        info = section.get("machine", {})
        lines += ["", f"## {name}", ""]
        lines.append(
            f"Measured {info.get('date')} at commit `{info.get('commit')}` on {info.get('cpu')}, "
            f"{info.get('cores')} cores; onnxruntime {info.get('onnxruntime')}, "
            f"torch {info.get('torch')}, Python {info.get('python')}."
        )
        lines.append("")
        if name == "speed":
            lines += _speed_table(section["rows"])
        else:
            lines += _detection_table(section["result"])
    md = out_dir / "RESULTS.md"
    old = md.read_text() if md.exists() else ""
    # Sections other benchmarks keep between `<!-- name -->` markers stay as they are.
    blocks = re.findall(r"(<!-- (\S+) -->.*?<!-- /\2 -->\n?)", old, re.S)
    md.write_text("\n".join(lines) + "\n" + "".join("\n" + block for block, _ in blocks))
    return md


def run_bench(args: argparse.Namespace, settings: PipelineSettings, console: Console) -> int:
    """Dispatch `bench speed|detection|quality|groupshots|all`."""
    data: Path = args.data
    if not data.is_dir():
        console.print(f"[red]error:[/red] benchmark data not found at {data} (use --data)")
        return 2
    sections: dict[str, Any] = {}
    if args.what in ("speed", "all"):
        rows = []
        detectors = [args.detector] if args.detector else list(DETECTORS)
        for rel in SPEED_SETS:
            for det in detectors:
                console.print(f"speed: {rel} with {det} …")
                row = speed_benchmark(
                    data / rel, settings.model_copy(update={"detector": det}), limit=args.limit
                )
                console.print(row)
                rows.append(row)
        sections["speed"] = {"machine": machine(), "limit": args.limit, "rows": rows}
    if args.what in ("detection", "all"):
        from bench.detection import detection_benchmark

        console.print("detection: voc-faces recall and scenery false positives …")
        result = detection_benchmark(data, settings)
        console.print(result)
        sections["detection"] = {"machine": machine(), "result": result}
    if sections:
        md = write_results(args.out, sections)
        console.print(f"wrote {md}")
    if args.what == "groupshots":
        from bench.groupshots import run_groupshots, write_groupshots

        console.print("groupshots: group photos shrunk onto 12-MP canvases …")
        shots = run_groupshots(
            data, settings, split=args.split, limit=args.limit, rounds=args.rounds
        )
        console.print(f"wrote {write_groupshots(args.out, shots)}")
    if args.what in ("quality", "all"):
        from bench.quality import run_quality

        run_quality(
            data,
            settings,
            sets=args.sets,
            albums=args.albums,
            cache_dir=args.cache,
            out_dir=args.out,
            compare=[settings.model_copy(update={"detector": d}) for d in args.compare],
        )
        console.print(f"wrote {args.out / 'QUALITY.md'} and {args.out / 'quality.json'}")
    return 0
