"""The peer for `bench/compare_insightface.py`: InsightFace 0.7.3 as its users run it.

Runs in its OWN virtualenv, never the product's (see docs/throughput.md):

    python -m venv ../peer-venv
    ../peer-venv/bin/pip install insightface==0.7.3 onnxruntime==1.32.0 scikit-learn

What `FaceAnalysis(allowed_modules=["detection", "recognition"])` does, with the model classes
chosen explicitly: `model_zoo.get_model` takes this SCRFD file's batched outputs for another
model. Per photo: `cv2.imread`, `SCRFD.detect` at det_size 640x640, then for each face
`ArcFaceONNX.get` (align and embed one face at a time); at the end scikit-learn's average
linkage on cosine distance. Default ONNX Runtime sessions (its own thread choice).

Protocol: one JSON command per line on stdin, one JSON answer per line on stdout:
{"ping": true} -> {"ready": true} (once its imports are done);
{"load": {"scrfd": path, "arcface": path}} -> {"load_s": ...};
{"run": [photo paths], "threshold": cosine} -> {"wall_s", "faces", "people", "peak_rss_mb"}.
"""

import json
import resource
import sys
import time

import cv2
import numpy as np
import onnxruntime
from insightface.app.common import Face
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD
from sklearn.cluster import AgglomerativeClustering


def load(paths):
    providers = ["CPUExecutionProvider"]
    det = SCRFD(paths["scrfd"], onnxruntime.InferenceSession(paths["scrfd"], providers=providers))
    det.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    rec = ArcFaceONNX(
        paths["arcface"], onnxruntime.InferenceSession(paths["arcface"], providers=providers)
    )
    rec.prepare(-1)
    return det, rec


def run(det, rec, photos, threshold):
    start = time.perf_counter()
    embeddings = []
    for path in photos:
        img = cv2.imread(path)
        if img is None:
            continue
        bboxes, kpss = det.detect(img, max_num=0, metric="default")
        for i in range(bboxes.shape[0]):
            face = Face(bbox=bboxes[i, 0:4], kps=kpss[i], det_score=bboxes[i, 4])
            rec.get(img, face)
            embeddings.append(face.normed_embedding)
    people = 0
    if len(embeddings) > 1:
        labels = AgglomerativeClustering(
            n_clusters=None,
            metric="cosine",
            linkage="average",
            distance_threshold=1.0 - threshold,
        ).fit_predict(np.asarray(embeddings))
        counts = np.bincount(labels)
        people = int((counts > 1).sum())
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": wall, "faces": len(embeddings), "people": people, "peak_rss_mb": rss}


def main():
    det = rec = None
    for line in sys.stdin:
        command = json.loads(line)
        if "ping" in command:
            answer = {"ready": True}
        elif "load" in command:
            start = time.perf_counter()
            det, rec = load(command["load"])
            answer = {"load_s": time.perf_counter() - start}
            # Warm-up off the clock: first calls allocate arenas.
            run(det, rec, command.get("warmup", []), 0.34)
        else:
            answer = run(det, rec, command["run"], command["threshold"])
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
