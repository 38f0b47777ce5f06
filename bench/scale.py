"""`aftertrip-faces bench scale`: what grouping costs as a trip grows (time and peak memory).

Each size runs in a subprocess of its own (`python -m bench.scale --one N --method M`), so its
peak resident memory (`ru_maxrss`) is that size's alone. Faces are LFW-based: the labelled
faces of the LFW identities with 2+ photos (through the product's pipeline, read from the
`bench quality` face cache), expanded to any size by making new people out of real ones:

- a synthetic person is a real LFW person moved elsewhere in embedding space: the part of each
  embedding that the set's mean face does not explain is permuted (one random permutation of
  the 512 coordinates, and random signs, per synthetic person), then a little noise (0.005 per
  coordinate) is added and the vector normalised. A permutation is a rotation, so the
  similarities among one person's faces stay those of the real person, while two synthetic
  people are as alike as two random residuals plus the shared mean face;
- the faces are dealt into photos of 1-3 faces (2 on average), in a shuffled order.

`bench/RESULTS.md` gets a section of its own between `<!-- scale -->` markers, and
`bench/results.json` the key "scale".
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

SIZES = (1_000, 5_000, 20_000, 50_000, 100_000, 200_000)
DENSE_LIMIT = 20_000
"""Sizes up to which the old dense grouping is measured too (its matrix is n x n)."""
EXACT_LIMIT = 200_000
"""Sizes above the product's exact limit (`worker.cluster.EXACT_GRAPH_LIMIT`) up to which the
graph is also computed exactly, to compare with the cells index."""
CELLS_FROM = 50_000
"""Sizes from here up to the product's exact limit also get a row with the cells index (what
`auto` uses above that limit), compared with the exact graph."""
NOISE = 0.005
BASE_FILE = "lfw-base.npz"
MARKER = "scale"


@dataclass(frozen=True)
class Base:
    """The real faces synthetic people are made from: embeddings and who is who."""

    embeddings: NDArray[np.float32]
    identity: NDArray[np.int64]


def lfw_base(
    data_dir: Path, cache_dir: Path | None, identities: int | None, *, cached_only: bool = False
) -> Base:
    """The labelled (largest) face of each photo of the first `identities` LFW people with
    2+ photos (all when None; with `cached_only`, only people whose photos are all in the
    face cache already); faces not yet in the cache are computed and cached."""
    from bench.quality import FaceCache, list_set
    from worker.settings import PipelineSettings

    faces_dev = data_dir / "faces-dev" if (data_dir / "faces-dev").is_dir() else data_dir
    cache = FaceCache(PipelineSettings(), cache_dir)
    files = {k: v for k, v in list_set(faces_dev, "lfw").items() if len(v) >= 2}
    if cached_only:
        files = {k: v for k, v in files.items() if all(cache.has(p) for p in v)}
    names = sorted(files)[:identities] if identities else sorted(files)
    emb, who = [], []
    for k, name in enumerate(names):
        for path in files[name]:
            faces = cache.get(path)
            big = faces.largest()
            if big >= 0:
                emb.append(faces.embeddings[big])
                who.append(k)
    if not emb:
        raise FileNotFoundError(
            f"no LFW faces under {faces_dev / 'lfw'} (or none cached with cached_only): run "
            "`aftertrip-faces bench quality --sets lfw` once, or drop --cached-only"
        )
    return Base(np.asarray(emb, np.float32), np.asarray(who, np.int64))


def synthetic_trip(
    base: Base, n: int, seed: int = 0
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """`n` faces (embeddings, photo index, person) of people made from the base's people."""
    rng = np.random.default_rng(seed)
    mean = base.embeddings.mean(axis=0)
    residual = base.embeddings - mean
    people = np.unique(base.identity)
    rows = [np.flatnonzero(base.identity == p) for p in people]
    dim = base.embeddings.shape[1]
    out = np.empty((n, dim), np.float32)
    person = np.empty(n, np.int64)
    filled, k = 0, 0
    while filled < n:
        real = rows[k % len(rows)]
        take = min(len(real), n - filled)
        chunk = residual[real[:take]]
        if k >= len(rows):  # the real people first, as they are; then moved copies
            chunk = chunk[:, rng.permutation(dim)] * rng.choice([-1.0, 1.0], dim)
            chunk = chunk + rng.normal(scale=NOISE, size=chunk.shape)
        out[filled : filled + take] = chunk + mean
        person[filled : filled + take] = k
        filled += take
        k += 1
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    order = rng.permutation(n)
    out, person = out[order], person[order]
    per_photo = rng.integers(1, 4, size=n)
    photo = np.repeat(np.arange(n), per_photo)[:n]
    return out, photo, person


def _singletons(labels: NDArray[np.int64]) -> NDArray[np.int64]:
    """Labels with each face in "others" (-1) a group of its own."""
    out = labels.copy()
    alone = np.flatnonzero(out < 0)
    out[alone] = out.max(initial=-1) + 1 + np.arange(len(alone))
    return out


def bcubed(truth: NDArray[np.int64], labels: NDArray[np.int64]) -> dict[str, float]:
    """BCubed precision/recall/F1 of face labels against the people (-1: a singleton)."""
    pred = _singletons(labels)
    _, t = np.unique(truth, return_inverse=True)
    _, p = np.unique(pred, return_inverse=True)
    key, count = np.unique(t * (p.max() + 1) + p, return_counts=True)
    kt, kp = key // (p.max() + 1), key % (p.max() + 1)
    size_t, size_p = np.bincount(t), np.bincount(p)
    sq = count.astype(np.float64) ** 2
    prec = float((sq / size_p[kp]).sum() / len(truth))
    rec = float((sq / size_t[kt]).sum() / len(truth))
    return {"p": prec, "r": rec, "f1": 2 * prec * rec / (prec + rec)}


def agreement(a: NDArray[np.int64], b: NDArray[np.int64]) -> float:
    """BCubed F1 of one grouping against another (1.0: the same partition)."""
    return bcubed(_singletons(a), b)["f1"]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_one(base_file: Path, n: int, method: str) -> dict[str, Any]:
    """Group `n` synthetic faces with `method` in this process: seconds, peak RSS, quality."""
    from bench.dense_grouping import dense_cluster_faces
    from worker import cluster

    data = np.load(base_file)
    base = Base(data["embeddings"], data["identity"])
    emb, photo, person = synthetic_trip(base, n)
    del base, data
    before = _peak_mb()
    cpu = _cpu_seconds()
    start = time.perf_counter()
    if method == "dense":
        labels = dense_cluster_faces(emb, photo).labels
        graph_index = "dense"
    else:
        index = {"graph": "auto", "graph-exact": "exact", "graph-cells": "cells"}[method]
        labels = cluster.cluster_faces(emb, photo, index=index).labels
        graph_index = (
            index if index != "auto" else ("exact" if n <= cluster.EXACT_GRAPH_LIMIT else "cells")
        )
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    np.save(f"/tmp/aftertrip-scale-{os.getpid()}-{n}-{method}.npy", labels)
    return {
        "n": n,
        "method": method,
        "graph": graph_index,
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(_peak_mb()),
        "rss_before_mb": round(before),
        "people": int(person.max() + 1),
        "groups": int(len(np.unique(labels[labels >= 0]))),
        "others": int((labels < 0).sum()),
        "bcubed": {k: round(v, 4) for k, v in bcubed(person, labels).items()},
        "load_before": round(os.getloadavg()[0], 1),
        "labels_file": f"/tmp/aftertrip-scale-{os.getpid()}-{n}-{method}.npy",
    }


def _run_child(base_file: Path, n: int, method: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.scale", "--one", str(n), "--method", method]
    cmd += ["--base", str(base_file)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"n": n, "method": method, "error": f"over {timeout:.0f} s, stopped"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"n": n, "method": method, "error": f"exit {done.returncode}: {' '.join(tail)}"}
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["uptime"] = _uptime()
    return row


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load {os.getloadavg()}"


def run_scale(
    data_dir: Path,
    *,
    sizes: tuple[int, ...] = SIZES,
    identities: int | None = None,
    cache_dir: Path | None = None,
    out_dir: Path = Path("bench"),
    timeout: float = 900,
    dense_limit: int = DENSE_LIMIT,
    exact_limit: int = EXACT_LIMIT,
    cached_only: bool = False,
) -> dict[str, Any]:
    """Measure every size (product grouping; the dense one and the exact graph up to their
    limits), write bench/results.json ("scale") and bench/RESULTS.md (its marked section)."""
    from bench.env import machine

    base = lfw_base(Path(data_dir), cache_dir, identities, cached_only=cached_only)
    work = Path("/tmp") / f"aftertrip-scale-{os.getpid()}"
    work.mkdir(exist_ok=True)
    base_file = work / BASE_FILE
    np.savez(base_file, embeddings=base.embeddings, identity=base.identity)
    rows = []
    for n in sizes:
        methods = ["graph"]
        if n <= exact_limit and n > _exact_graph_limit():
            methods.append("graph-exact")
        if CELLS_FROM <= n <= _exact_graph_limit():
            methods.append("graph-cells")
        if n <= dense_limit:
            methods.append("dense")
        got: dict[str, dict[str, Any]] = {}
        for method in methods:
            logger.info("scale: %d faces, %s ...", n, method)
            row = _run_child(base_file, n, method, timeout)
            logger.info("scale: %s", row)
            got[method] = row
        reference = got.get("dense") or got.get("graph-exact")
        if reference is None and "graph-cells" in got:
            reference = got["graph"]  # exact at this size
        for row in got.values():
            if reference is not None and row is not reference and "labels_file" in row:
                if "labels_file" in reference:
                    ref, mine = np.load(reference["labels_file"]), np.load(row["labels_file"])
                    row["same_as"] = reference["method"]
                    row["agreement"] = round(agreement(ref, mine), 6)
                    row["identical"] = bool(np.array_equal(ref, mine))
        for row in got.values():
            labels_file = row.pop("labels_file", None)
            if labels_file:
                Path(labels_file).unlink(missing_ok=True)
            rows.append(row)
    result = {
        "machine": machine(),
        "base": {
            "faces": int(len(base.identity)),
            "people": int(len(np.unique(base.identity))),
        },
        "rows": rows,
    }
    write_scale(Path(out_dir), result)
    return result


def _exact_graph_limit() -> int:
    from worker.cluster import EXACT_GRAPH_LIMIT

    return EXACT_GRAPH_LIMIT


def render(result: dict[str, Any]) -> str:
    """The RESULTS.md section, markers included."""
    info, base = result["machine"], result["base"]
    lines = [
        f"<!-- {MARKER} -->",
        "## scale: grouping cost by trip size",
        "",
        f"Measured {info.get('date')} at commit `{info.get('commit')}` on {info.get('cpu')}, "
        f"{info.get('cores')} cores (shared: see the load column), Python {info.get('python')}. "
        "`aftertrip-faces bench scale`; each row is one subprocess; peak RSS is the "
        "process's `ru_maxrss` (embeddings and Python included; *before* is the peak before "
        f"grouping started). Faces: LFW-based ({base['faces']} real labelled faces of "
        f"{base['people']} people with 2+ photos, expanded as `bench/scale.py` describes). "
        "*agreement*: BCubed F1 of this grouping against the reference row (dense, else the "
        "exact graph) of the same size; 1.0 = the same partition. *s* is wall time, *CPU s* "
        "the process's user+system time (BLAS uses both cores: CPU s can exceed s on an idle "
        "machine; on a loaded one, s is mostly waiting).",
        "",
        "| faces | method | graph | s | CPU s | peak RSS MB | before MB | people | groups | "
        "others | BCubed P | BCubed R | BCubed F1 | agreement | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['method']} | | {r['error']} | | | | | | | | | | | |")
            continue
        b = r["bcubed"]
        agree = ""
        if "agreement" in r:
            same = "identical" if r["identical"] else f"{r['agreement']:.4f}"
            agree = f"{same} vs {r['same_as']}"
        load = r.get("uptime", "").split("load average:")[-1].split(",")[0].strip()
        lines.append(
            f"| {r['n']} | {r['method']} | {r['graph']} | {r['seconds']} | {r['cpu_s']} | "
            f"{r['peak_rss_mb']} | "
            f"{r['rss_before_mb']} | {r['people']} | {r['groups']} | {r['others']} | "
            f"{b['p']:.4f} | {b['r']:.4f} | {b['f1']:.4f} | {agree} | {load} |"
        )
    lines.append(f"<!-- /{MARKER} -->")
    return "\n".join(lines) + "\n"


def write_scale(out_dir: Path, result: dict[str, Any]) -> Path:
    """Store the "scale" key of results.json and this section of RESULTS.md (in place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "results.json"
    data: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    data[MARKER] = result
    store.write_text(json.dumps(data, indent=1))
    md = out_dir / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Benchmark results\n"
    md.write_text(replace_marked(text, MARKER, render(result)))
    return md


def replace_marked(text: str, marker: str, section: str) -> str:
    """`text` with its `<!-- marker -->` ... `<!-- /marker -->` block replaced by `section`
    (appended when there is none)."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        return head + section + ("\n" + tail if tail else "")
    return text.rstrip("\n") + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    """The per-size child: print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--one", type=int, required=True)
    parser.add_argument("--method", default="graph")
    parser.add_argument("--base", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(measure_one(args.base, args.one, args.method)))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
