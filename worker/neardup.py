"""Near-duplicate shots: a small face follows the bigger face of the same person in another
shot of the same group (issue 17).

People take several shots of one group, some from further back. When two photos show the
same faces standing the same way, their face centres match up to scale and translation; a
small face (`AFTERTRIP_SMALL_FACE`) that the grouping left in "others" then follows the
folder of the large face at its place in the other shot, when its own embedding does not
contradict it. Only what a photo gives is used: its faces' boxes and embeddings, and the
grouping's labels; never a file name or a time. Cheap: numbers, no pixels.

`layout_match` matches two photos' face layouts; `follow_near_duplicates` applies the rule to
a grouping. The result file (`worker.pipeline`), the prototype's API (`worker.compat`) and a
trip's folders (`worker.folders`) all call `follow_near_duplicates` after the grouping.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

from worker.cluster import Clustering

logger = logging.getLogger(__name__)

MIN_MATCHED = 3
"""Faces a layout match needs on each side (two points always fit scale and translation)."""

RESIDUAL = 0.2
"""A matched face's centre lies at most this many of its face widths (in the larger shot) from
where the fitted scale and translation put it."""

SIZE_TOLERANCE = 0.3
"""A matched pair's face widths agree with the fitted scale within this share."""

SEED_RESIDUAL = 1.0
"""The first, loose residual (face widths) of a hypothesis from one pair of faces (the width
ratio gives its scale, noisily), before it is refitted on its inliers."""

FOLLOW_FLOOR = 0.2
"""A small face follows a matched large face's folder only when its cosine to the folder's
mean is at least this, and that folder is the one it is closest to."""

SEED_FACES = 6
"""Faces of A (its largest) that seed hypotheses, each with every face of B."""

HYPOTHESES = 4
"""Seeds with the most loose inliers that are refitted."""

AGREEMENT = 0.75
"""Of the matched faces grouped on both sides, at least this share must be in one group."""

NEAREST = True
"""A small face follows only into the group whose mean it is closest to."""

CANDIDATE_PHOTOS = 4

NEAREST_BLOCK = 1024
"""Small faces whose nearest large face is looked up at once."""
"""Other photos tried per photo: those sharing the most people (or nearest faces) with it."""


@dataclass(frozen=True)
class LayoutMatch:
    """Faces of photo A matched one-to-one to faces of photo B: B = scale * A + shift."""

    pairs: list[tuple[int, int]]
    scale: float
    residual: float
    """Mean distance of the matched centres from the fit, in B's face widths."""


def _centres(boxes: NDArray[np.floating]) -> NDArray[np.float64]:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)


def _widths(boxes: NDArray[np.floating]) -> NDArray[np.float64]:
    """Each face's size, the longer side of its box (as `worker.boxes.face_size`)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.maximum(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1e-6)


def _fit(a: NDArray[np.float64], b: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
    """Least-squares scale and shift with b = s * a + t."""
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    da, db = a - ma, b - mb
    denom = float((da * da).sum())
    s = float((da * db).sum() / denom) if denom > 0 else 0.0
    return s, mb - s * ma


def _assign(
    a: NDArray[np.float64],
    b: NDArray[np.float64],
    wa: NDArray[np.float64],
    wb: NDArray[np.float64],
    s: float,
    t: NDArray[np.float64],
    tolerance: float,
) -> tuple[list[tuple[int, int]], float]:
    """One-to-one pairs whose centres and widths agree with (s, t); their mean residual."""
    if s <= 0:
        return [], np.inf
    pred = a * s + t
    diff = pred[:, None, :] - b[None, :, :]
    dist = np.sqrt((diff * diff).sum(axis=2)) / wb[None, :]
    size_ok = np.abs(s * wa[:, None] / wb[None, :] - 1) <= SIZE_TOLERANCE
    cost = np.where((dist <= tolerance) & size_ok, dist, 1e6)
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] < 1e6
    pairs = [(int(i), int(j)) for i, j in zip(rows[keep], cols[keep], strict=True)]
    residual = float(dist[rows[keep], cols[keep]].mean()) if pairs else np.inf
    return pairs, residual


def layout_match(
    boxes_a: NDArray[np.floating],
    boxes_b: NDArray[np.floating],
    *,
    min_matched: int = MIN_MATCHED,
    residual: float = RESIDUAL,
) -> LayoutMatch | None:
    """The faces of A and B that stand the same way (B's centres = scale x A's + shift), one
    to one, when at least `min_matched` do, each within `residual` of B's face widths of the
    fit; else None. Each pair of faces seeds a hypothesis (scale from the width ratio), which
    is refitted by least squares on its inliers while the tolerance tightens."""
    a, b = _centres(boxes_a), _centres(boxes_b)
    if len(a) < min_matched or len(b) < min_matched:
        return None
    wa, wb = _widths(boxes_a), _widths(boxes_b)
    # Each (i, j) seeds s = wb/wa, t = b_j - s a_i (i among A's largest faces, to bound the
    # work); count its loose inliers (not one to one).
    seeds = np.argsort(-wa, kind="stable")[:SEED_FACES]
    s = wb[None, :] / wa[seeds, None]  # (k, m)
    t = b[None, :, :] - s[:, :, None] * a[seeds, None, :]  # (k, m, 2)
    pred = s[:, :, None, None] * a[None, None, :, :] + t[:, :, None, :]  # (n, m, n, 2)
    dx = pred[..., 0, None] - b[:, 0]  # (k, m, n, m)
    dy = pred[..., 1, None] - b[:, 1]
    near = ((dx * dx + dy * dy) <= (SEED_RESIDUAL * wb) ** 2).any(axis=3)  # (k, m, n)
    votes = near.sum(axis=2)
    best: LayoutMatch | None = None
    for flat in np.argsort(-votes, axis=None, kind="stable")[:HYPOTHESES]:
        i, j = (int(x) for x in np.unravel_index(flat, votes.shape))
        if votes[i, j] < min_matched:
            break
        scale, shift = float(s[i, j]), t[i, j]
        pairs: list[tuple[int, int]] = []
        err = np.inf
        for tolerance in (SEED_RESIDUAL, 0.5, residual):
            pairs, err = _assign(a, b, wa, wb, scale, shift, tolerance)
            if len(pairs) < 2:
                break
            ia, ib = (np.asarray(x) for x in zip(*pairs, strict=True))
            scale, shift = _fit(a[ia], b[ib])
        if len(pairs) >= 2:
            pairs, err = _assign(a, b, wa, wb, scale, shift, residual)
        if len(pairs) >= min_matched and (
            best is None or (len(pairs), -err) > (len(best.pairs), -best.residual)
        ):
            best = LayoutMatch(sorted(pairs), scale, err)
    return best


def _unit(v: NDArray[np.float64]) -> NDArray[np.float64]:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.asarray(v / np.where(norm > 0, norm, 1.0), np.float64)


def follow_near_duplicates(
    clustering: Clustering,
    embeddings: NDArray[np.floating],
    photo_index: NDArray[np.integer],
    boxes: NDArray[np.floating],
    small: NDArray[np.bool_] | None,
    *,
    cannot_link: Sequence[tuple[int, int]] = (),
    floor: float = FOLLOW_FLOOR,
) -> Clustering:
    """`clustering` with each small face in "others" moved to the group of the large face at
    its place in a near-duplicate shot (`layout_match` with a photo sharing people with its
    own), when: that large face is in a group; the group holds no face of its photo and no
    face cannot-linked to it; its cosine to the group's mean is at least `floor` and no
    group's mean is closer; and every near-duplicate shot agrees. Faces of the two shots
    that are both grouped must agree (none in different groups) and at least one must, or the
    match is not used. Strangers (faces matched to no face, or to a face in "others") stay."""
    labels = np.asarray(clustering.labels, np.int64)
    n = len(labels)
    if small is None or n == 0 or not (small & (labels < 0)).any():
        return clustering
    photos = np.asarray(photo_index, np.int64)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    vectors = _unit(np.asarray(embeddings, np.float64))
    groups = np.unique(labels[labels >= 0])
    if not len(groups):
        return clustering
    means = _unit(np.stack([vectors[labels == g].mean(axis=0) for g in groups]))
    by_photo: dict[int, NDArray[np.int64]] = {}
    for p in np.unique(photos):
        by_photo[int(p)] = np.flatnonzero(photos == p)
    photos_of_group: dict[int, set[int]] = defaultdict(set)
    for f in np.flatnonzero(labels >= 0):
        photos_of_group[int(labels[f])].add(int(photos[f]))
    partners: dict[int, set[int]] = defaultdict(set)
    for x, y in cannot_link:
        partners[int(x)].add(int(y))
        partners[int(y)].add(int(x))

    nearest = _nearest_anchors(vectors, labels, photos, small)
    proposals: dict[int, set[tuple[int, int]]] = defaultdict(set)  # face -> {(group, via)}
    for p, faces in by_photo.items():
        if len(faces) < MIN_MATCHED or not (small[faces] & (labels[faces] < 0)).any():
            continue
        for q in _candidates(p, faces, labels, photos_of_group, nearest):
            other = by_photo[q]
            if len(other) < MIN_MATCHED:
                continue
            match = layout_match(boxes[faces], boxes[other])
            if match is None:
                continue
            pairs = [(int(faces[i]), int(other[j])) for i, j in match.pairs]
            both = [(x, y) for x, y in pairs if labels[x] >= 0 and labels[y] >= 0]
            agree = sum(labels[x] == labels[y] for x, y in both)
            if not agree or agree < AGREEMENT * len(both):
                continue
            for x, y in pairs:
                if small[x] and labels[x] < 0 and not small[y] and labels[y] >= 0:
                    proposals[x].add((int(labels[y]), y))

    out = labels.copy()
    matched = np.asarray(clustering.matched_face, np.int64).copy()
    similarity = np.asarray(clustering.similarity, np.float32).copy()
    for face in sorted(proposals):
        targets = {g for g, _ in proposals[face]}
        if len(targets) != 1:
            continue  # the near-duplicate shots disagree
        group = targets.pop()
        cos = means @ vectors[face]
        k = int(np.searchsorted(groups, group))
        if cos[k] < floor or (NEAREST and int(np.argmax(cos)) != k):
            continue
        photo = int(photos[face])
        if photo in photos_of_group[group]:
            continue
        if any(out[o] == group for o in partners.get(face, ())):
            continue
        via = min(y for _, y in proposals[face])
        out[face] = group
        photos_of_group[group].add(photo)
        matched[face] = via
        similarity[face] = float(vectors[face] @ vectors[via])
        logger.debug("near duplicate: face %d follows face %d to group %d", face, via, group)
    return Clustering(out, matched, similarity)


def _nearest_anchors(
    vectors: NDArray[np.float64],
    labels: NDArray[np.int64],
    photos: NDArray[np.int64],
    small: NDArray[np.bool_],
) -> dict[int, int]:
    """For each small face in "others", the photo of the large grouped face of another photo
    nearest it (a block of faces at a time: memory grows with the block, not faces squared)."""
    loose = np.flatnonzero(small & (labels < 0))
    anchors = np.flatnonzero((labels >= 0) & ~small)
    out: dict[int, int] = {}
    if not len(loose) or not len(anchors):
        return out
    for lo in range(0, len(loose), NEAREST_BLOCK):
        block = loose[lo : lo + NEAREST_BLOCK]
        cos = vectors[block] @ vectors[anchors].T
        cos[photos[block][:, None] == photos[anchors][None, :]] = -np.inf
        nearest = anchors[np.argmax(cos, axis=1)]
        out.update(zip(block.tolist(), photos[nearest].tolist(), strict=True))
    return out


def _candidates(
    photo: int,
    faces: NDArray[np.int64],
    labels: NDArray[np.int64],
    photos_of_group: dict[int, set[int]],
    nearest: dict[int, int],
) -> list[int]:
    """Other photos worth a layout match: those holding the most of this photo's grouped
    people, then those of the large grouped faces nearest its small faces in "others"."""
    votes: dict[int, int] = defaultdict(int)
    for g in labels[faces][labels[faces] >= 0]:
        for q in photos_of_group[int(g)]:
            if q != photo:
                votes[q] += 1
    for f in faces.tolist():
        q = nearest.get(f, photo)
        if q != photo:
            votes[q] += 1
    return sorted(votes, key=lambda q: (-votes[q], q))[:CANDIDATE_PHOTOS]
