"""The product's default worker against InsightFace 0.7.3, interleaved in one run.

    python -m bench.compare_insightface --peer-python ../peer-venv/bin/python

Each side runs in its own process (the peer in its own virtualenv: see
`bench/peer_insightface.py` for the command that makes it), loads its models once, when both
have finished importing (timed, then warmed up off the clock), and gets the same photo lists
in turns, product and peer alternating which goes first, `--rounds` times; the best wall
time of each side per set counts. Both use the same SCRFD-500M and w600k_mbf files. The
peer's photos/s over the product's, the peak RSS of each process and the machine's load
average during the run go into bench/compare.json and a marked section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from bench.env import machine

logger = logging.getLogger(__name__)

SETS = {"g20": ("group-photos/g20", None), "celeba": ("faces-dev/celeba", 300)}
"""Set name -> (folder under the data folder, photos taken: the first N sorted, or all)."""

MARK_BEGIN = "<!-- compare-insightface -->"
MARK_END = "<!-- /compare-insightface -->"


def photo_list(folder: Path, limit: int | None) -> list[str]:
    """Photos under `folder`, sorted by path, the first `limit`."""
    # What both sides read: the product's photo types that OpenCV (the peer's reader) reads too.
    suffixes = {".jpg", ".jpeg", ".png", ".webp"}
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in suffixes)
    return files[:limit] if limit else files


# --- the product's side (this virtualenv) ----------------------------------------------------


def serve_product() -> None:
    """The product's side of the protocol in `bench/peer_insightface.py`, default settings."""
    from worker.pipeline import FacePipeline, group_album
    from worker.settings import PipelineSettings
    from worker.types import PhotoSource

    def sources(paths: list[str]) -> list[PhotoSource]:
        return [PhotoSource(id=p, name=Path(p).name, read=Path(p).read_bytes) for p in paths]

    settings = PipelineSettings()
    pipeline: FacePipeline | None = None
    for line in sys.stdin:
        command = json.loads(line)
        if "ping" in command:
            answer: dict[str, Any] = {"ready": True}
        elif "load" in command:
            start = time.perf_counter()
            pipeline = FacePipeline(settings)
            _ = pipeline.models
            answer = {"load_s": time.perf_counter() - start}
            group_album(sources(command.get("warmup", [])), settings, pipeline=pipeline)
        else:
            start = time.perf_counter()
            result = group_album(sources(command["run"]), settings, pipeline=pipeline)
            answer = {
                "wall_s": time.perf_counter() - start,
                "faces": len(result.faces),
                "people": len(result.groups),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "torch_loaded": "torch" in sys.modules,
            }
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


# --- the orchestrator ---------------------------------------------------------------------------


class Side:
    """One side's process, spoken to a JSON line at a time."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        stdin: IO[str] | None = self.process.stdin
        stdout: IO[str] | None = self.process.stdout
        if stdin is None or stdout is None:
            raise RuntimeError(f"{self.name} has no pipes")
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} stopped (exit {self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def compare(
    data: Path, peer_python: str, rounds: int, sets: list[str], threshold: float
) -> dict[str, Any]:
    """Load both sides, then run every set on both in turns; the best of `rounds` counts."""
    from worker.models import resolve_model

    models = {
        "scrfd": resolve_model("scrfd_500m_bnkps").path,
        "arcface": resolve_model("w600k_mbf").path,
    }
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    peer_script = str(Path(__file__).with_name("peer_insightface.py"))
    measured_on = machine()  # before the runs: the commit that is measured
    lists = {name: photo_list(data / SETS[name][0], SETS[name][1]) for name in sets}
    warmup = lists[sets[0]][:2]
    sides = {
        "product": Side(
            "product", [sys.executable, "-m", "bench.compare_insightface", "--serve"], env
        ),
        "insightface": Side("insightface", [peer_python, peer_script], env),
    }
    # Both processes done importing before either loads: a side's model load is timed while
    # the other is idle, not while it imports its libraries on the same cores.
    for side in sides.values():
        side.ask({"ping": True})
    loads = {name: side.ask({"load": models, "warmup": warmup}) for name, side in sides.items()}
    runs: list[dict[str, Any]] = []
    try:
        for round_no in range(rounds):
            order = ["product", "insightface"]
            if round_no % 2:
                order.reverse()
            for set_name in sets:
                for side_name in order:
                    answer = sides[side_name].ask({"run": lists[set_name], "threshold": threshold})
                    answer.update(
                        side=side_name, set=set_name, round=round_no, load_avg=os.getloadavg()[0]
                    )
                    logger.info("%s", answer)
                    runs.append(answer)
    finally:
        for side in sides.values():
            side.close()
    rows = []
    for set_name in sets:
        best = {
            side: min(
                (r for r in runs if r["side"] == side and r["set"] == set_name),
                key=lambda r: r["wall_s"],
            )
            for side in sides
        }
        photos = len(lists[set_name])
        rows.append(
            {
                "set": set_name,
                "photos": photos,
                "product_s": round(best["product"]["wall_s"], 2),
                "insightface_s": round(best["insightface"]["wall_s"], 2),
                "product_faces": best["product"]["faces"],
                "insightface_faces": best["insightface"]["faces"],
                "product_photos_per_s": round(photos / best["product"]["wall_s"], 2),
                "insightface_photos_per_s": round(photos / best["insightface"]["wall_s"], 2),
                "ratio": round(best["insightface"]["wall_s"] / best["product"]["wall_s"], 2),
            }
        )
    peak = {side: max(r["peak_rss_mb"] for r in runs if r["side"] == side) for side in sides}
    load_avgs = [r["load_avg"] for r in runs]
    return {
        "machine": measured_on,
        "rounds": rounds,
        "threshold": threshold,
        "rows": rows,
        "load_s": {name: round(v["load_s"], 3) for name, v in loads.items()},
        "peak_rss_mb": {k: round(v) for k, v in peak.items()},
        "torch_loaded": any(r.get("torch_loaded") for r in runs),
        "load_avg_1min": [round(min(load_avgs), 2), round(max(load_avgs), 2)],
        "runs": runs,
    }


def render(result: dict[str, Any], command: str) -> str:
    """The marked RESULTS.md section for one comparison."""
    info = result["machine"]
    lines = [
        MARK_BEGIN,
        "## product default vs InsightFace 0.7.3 (`bench/compare_insightface.py`)",
        "",
        f"Measured {info['date']} at commit `{info['commit']}` on {info['cpu']}, "
        f"{info['cores']} cores, CPU only (no GPU was lent), onnxruntime {info['onnxruntime']}; "
        f"`{command}`. Interleaved, best of {result['rounds']}, model load excluded; "
        f"1-minute load average during the runs {result['load_avg_1min'][0]}"
        f"–{result['load_avg_1min'][1]} (the machine is shared: read the ratios, not the "
        "seconds).",
        "",
        "| set | photos | InsightFace s | product s | InsightFace photos/s | product photos/s "
        "| product ÷ InsightFace (photos/s) | faces (InsightFace / product) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['set']} | {r['photos']} | {r['insightface_s']} | {r['product_s']} | "
            f"{r['insightface_photos_per_s']} | {r['product_photos_per_s']} | "
            f"{r['ratio']}× | {r['insightface_faces']} / {r['product_faces']} |"
        )
    rss, load = result["peak_rss_mb"], result["load_s"]
    lines += [
        "",
        f"Peak RSS of each process over the whole run: product {rss['product']} MB, "
        f"InsightFace {rss['insightface']} MB. Model load: product {load['product']} s, "
        f"InsightFace {load['insightface']} s. torch imported by the product: "
        f"{'yes' if result['torch_loaded'] else 'no'}.",
        MARK_END,
    ]
    return "\n".join(lines)


def write_section(results_md: Path, section: str) -> None:
    """Replace (or append) the marked comparison section of RESULTS.md, nothing else."""
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results_md.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write bench/compare.json and the RESULTS.md section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer-python", default="../peer-venv/bin/python")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    parser.add_argument("--threshold", type=float, default=0.34, help="peer's cosine threshold")
    args = parser.parse_args(argv)
    if args.serve:
        serve_product()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not Path(args.peer_python).exists():
        parser.error(
            f"{args.peer_python} not found: make the peer's virtualenv first "
            "(see bench/peer_insightface.py)"
        )
    result = compare(args.data, args.peer_python, args.rounds, args.sets, args.threshold)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(result, indent=1))
    command = "python -m bench.compare_insightface " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    write_section(args.out / "RESULTS.md", render(result, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
