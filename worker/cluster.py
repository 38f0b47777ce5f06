"""Grouping face embeddings into people.

Two methods:
- `seed`: an exact port of the original prototype's greedy grouping, kept for comparison
  and for callers of the old API (`worker.compat`);
- `default`: average-linkage agglomeration on cosine similarity that never puts two faces
  of one photo into the same person.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from worker.models import REGISTRY

logger = logging.getLogger(__name__)

METHODS = ("default", "seed")


class UnknownGroupingMethod(ValueError):
    """The grouping method named in the settings does not exist."""


@dataclass(frozen=True)
class Clustering:
    """Which person each face belongs to, and why.

    labels: (n,) person index, or -1 for a face seen only once ("others");
    matched_face: (n,) the face it was matched to, -1 if none;
    similarity: (n,) cosine similarity to matched_face, nan if none.
    """

    labels: NDArray[np.int64]
    matched_face: NDArray[np.int64]
    similarity: NDArray[np.float32]


@dataclass
class SeedGroup:
    """One group as the prototype built it (face indices, not images)."""

    faces: list[int] = field(default_factory=list)
    matched: list[int | None] = field(default_factory=list)
    similarity: list[float] = field(default_factory=list)


def default_threshold(method: str, embedder: str) -> float:
    """The cosine threshold calibrated for an embedder and method (0.45 for the seed)."""
    spec = REGISTRY.get(embedder)
    if spec is not None and method in spec.thresholds:
        return spec.thresholds[method]
    return {"seed": 0.45}.get(method, 0.3)


def seed_grouping(similarity: NDArray[np.floating], threshold: float) -> list[SeedGroup]:
    """The prototype's greedy grouping, faces taken in order.

    A face joins the first group (in creation order) holding any face whose similarity
    (clipped to [0, 1], as the prototype did) is strictly above `threshold`; the matched face
    is the first such face of that group. Otherwise it opens a new group.
    """
    sim = np.clip(np.asarray(similarity, np.float64), 0.0, 1.0)
    groups: list[SeedGroup] = []
    for face in range(sim.shape[0]):
        for group in groups:
            hits = [f for f in group.faces if sim[f, face] > threshold]
            if hits:
                group.faces.append(face)
                group.matched.append(hits[0])
                group.similarity.append(float(sim[hits[0], face]))
                break
        else:
            groups.append(SeedGroup(faces=[face], matched=[None], similarity=[-1.0]))
    return groups


def _seed_clustering(sim: NDArray[np.float32], threshold: float) -> Clustering:
    n = sim.shape[0]
    labels = np.full(n, -1, np.int64)
    matched = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    for idx, group in enumerate(seed_grouping(sim, threshold)):
        if len(group.faces) < 2:
            continue
        for face, match, value in zip(group.faces, group.matched, group.similarity, strict=True):
            labels[face] = idx
            if match is not None:
                matched[face] = match
                similarity[face] = value
    return Clustering(labels, matched, similarity)


def _average_linkage(
    sim: NDArray[np.float64], cannot_link: NDArray[np.bool_], threshold: float
) -> NDArray[np.int64]:
    """Cluster ids (0..k-1, by first face) from constrained average-linkage merging.

    Repeatedly merges the two clusters with the highest mean pairwise similarity, as long
    as it is above `threshold` and no two of their faces come from the same photo.
    """
    m = sim.shape[0]
    total = sim.copy()
    np.fill_diagonal(total, 0.0)
    blocked = cannot_link.copy()
    np.fill_diagonal(blocked, True)
    sizes = np.ones(m)
    alive = np.ones(m, bool)
    owner = np.arange(m)
    while True:
        mean = total / np.outer(sizes, sizes)
        mean[blocked] = -np.inf
        mean[~alive, :] = -np.inf
        mean[:, ~alive] = -np.inf
        flat = int(np.argmax(mean))
        i, j = divmod(flat, m)
        if not np.isfinite(mean[i, j]) or mean[i, j] <= threshold:
            break
        i, j = min(i, j), max(i, j)
        total[i, :] += total[j, :]
        total[:, i] = total[i, :]
        total[i, i] = 0.0
        blocked[i, :] |= blocked[j, :]
        blocked[:, i] = blocked[i, :]
        blocked[i, i] = True
        sizes[i] += sizes[j]
        alive[j] = False
        owner[owner == j] = i
    _, ids = np.unique(owner, return_inverse=True)
    return ids.astype(np.int64)


def _explain(
    sim: NDArray[np.float32], labels: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """For each grouped face, its most similar face in the same group and that similarity."""
    n = len(labels)
    matched = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    for label in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == label)
        block = sim[np.ix_(members, members)].copy()
        np.fill_diagonal(block, -np.inf)
        best = np.argmax(block, axis=1)
        matched[members] = members[best]
        similarity[members] = block[np.arange(len(members)), best]
    return matched, similarity


def _default_clustering(
    sim: NDArray[np.float32], photo_index: NDArray[np.int64], threshold: float
) -> Clustering:
    n = sim.shape[0]
    labels = np.full(n, -1, np.int64)
    # Faces that share no edge above the threshold can never merge: cluster each
    # connected component of the threshold graph on its own (keeps big trips tractable).
    n_comp, component = connected_components(csr_matrix(sim > threshold), directed=False)
    next_label = 0
    for comp in range(n_comp):
        members = np.flatnonzero(component == comp)
        if len(members) < 2:
            continue
        block = sim[np.ix_(members, members)].astype(np.float64)
        photos = photo_index[members]
        cannot = photos[:, None] == photos[None, :]
        ids = _average_linkage(block, cannot, threshold)
        for cid in np.unique(ids):
            faces = members[ids == cid]
            if len(faces) >= 2:
                labels[faces] = next_label
                next_label += 1
    labels = _relabel_by_first_face(labels)
    matched, similarity = _explain(sim, labels)
    return Clustering(labels, matched, similarity)


def _relabel_by_first_face(labels: NDArray[np.int64]) -> NDArray[np.int64]:
    """Number people 0..k-1 in the order their first face appears (stable across runs)."""
    out = np.full_like(labels, -1)
    mapping: dict[int, int] = {}
    for i, label in enumerate(labels):
        if label >= 0:
            out[i] = mapping.setdefault(int(label), len(mapping))
    return out


def cluster_faces(
    embeddings: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    *,
    method: str = "default",
    threshold: float | None = None,
    embedder: str = "w600k_mbf",
) -> Clustering:
    """Group L2-normalised face embeddings (n, d); `photo_index` says which photo each face is in."""
    if method not in METHODS:
        raise UnknownGroupingMethod(f"unknown grouping method {method!r}; use one of {METHODS}")
    n = embeddings.shape[0]
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Clustering(empty, empty.copy(), np.zeros(0, np.float32))
    cut = default_threshold(method, embedder) if threshold is None else threshold
    sim = (embeddings @ embeddings.T).astype(np.float32)
    if method == "seed":
        return _seed_clustering(sim, cut)
    return _default_clustering(sim, np.asarray(photo_index, np.int64), cut)
