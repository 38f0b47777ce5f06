"""Grouping face embeddings into people.

Two methods:
- `seed`: an exact port of the original prototype's greedy grouping, kept for comparison
  and for callers of the old API (`worker.compat`);
- `default`, in two stages on cosine similarity, never putting two faces of one photo into
  the same person:
  1. constrained average linkage: repeatedly merge the two groups whose faces are most
     similar on average, while that mean is above the cut (`thresholds["default"]` of the
     embedder, 0.34 for w600k_mbf). Averages do not chain: a face that looks a bit like two
     people cannot glue them together, as it would with single linkage or greedy matching.
     Faces with a weak detection (optional `quality`) take no part in this stage;
  2. attach: each face still alone, and each pair, joins the established group (3+ faces) it
     resembles most on average, if that mean is above a lower bar (`thresholds["attach"]`,
     0.25): a mean over a whole group is steadier than the single pair stage 1 needed.
  Whatever is still alone is "others" (-1). Thresholds and the evidence for them:
  bench/QUALITY.md.

Corrections a person made enter `default` as constraints (`must_link`, `cannot_link`): a
must-link set starts stage 1 as one cluster that linkage only grows, a cannot-link pair never
shares a group; see `cluster_faces`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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


class InvalidConstraint(ValueError):
    """A must-link or cannot-link constraint names faces that do not exist, or a face twice."""


class ConstraintConflict(ValueError):
    """Constraints contradict each other: a pair is both must- and cannot-linked, or a must-link
    set holds two faces of one photo. The caller resolves which correction wins first."""


@dataclass(frozen=True)
class Constraints:
    """Must-link and cannot-link constraints, resolved against the faces.

    anchor: (n,) the must-link component of each face (sets sharing a face are one), -1 if none;
    cannot: (k, 2) face pairs that may not share a group: the caller's pairs, plus faces of one
    photo that belong to two different must-link components (one would have to leave the
    group, and a must-linked face never does).
    """

    anchor: NDArray[np.int64]
    cannot: NDArray[np.int64]

    @property
    def empty(self) -> bool:
        return not (self.anchor >= 0).any() and len(self.cannot) == 0

    def cannot_partners(self) -> dict[int, set[int]]:
        """For each face with a cannot-link, the faces it may not share a group with."""
        out: dict[int, set[int]] = {}
        for a, b in self.cannot.tolist():
            out.setdefault(a, set()).add(b)
            out.setdefault(b, set()).add(a)
        return out


def resolve_constraints(
    n: int,
    photo_index: NDArray[np.int64],
    must_link: Sequence[Sequence[int]] = (),
    cannot_link: Sequence[tuple[int, int]] = (),
) -> Constraints:
    """Check the constraints against `n` faces and join overlapping must-link sets.

    Raises `InvalidConstraint` for a face index outside 0..n-1 or a face cannot-linked to
    itself, and `ConstraintConflict` when a cannot-link pair ends in one must-link component or
    a component holds two faces of one photo. Sets of fewer than two faces constrain nothing.
    """
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    def check(face: int) -> int:
        if not 0 <= int(face) < n:
            raise InvalidConstraint(
                f"constraint names face {face}, but there are {n} faces (0..{n - 1}); "
                "build constraints from the same face list as the embeddings"
            )
        return int(face)

    linked = np.zeros(n, bool)
    for group in must_link:
        faces = [check(f) for f in group]
        if len(set(faces)) < 2:
            continue
        linked[faces] = True
        root = find(faces[0])
        for face in faces[1:]:
            other = find(face)
            if other != root:
                parent[other] = root
    anchor = np.full(n, -1, np.int64)
    if linked.any():
        roots = np.array([find(int(f)) for f in np.flatnonzero(linked)])
        _, anchor[linked] = np.unique(roots, return_inverse=True)
        members = np.flatnonzero(linked)
        key = anchor[members] * (int(photo_index.max()) + 1) + photo_index[members]
        uniq, counts = np.unique(key, return_counts=True)
        if (counts > 1).any():
            clash = members[key == uniq[counts > 1][0]]
            raise ConstraintConflict(
                f"faces {clash.tolist()} are must-linked into one person but come from one "
                f"photo (index {int(photo_index[clash[0]])}); keep one of them in the set"
            )
    pairs: list[tuple[int, int]] = []
    for a, b in cannot_link:
        a, b = check(a), check(b)
        if a == b:
            raise InvalidConstraint(f"face {a} is cannot-linked to itself; drop that pair")
        if anchor[a] >= 0 and anchor[a] == anchor[b]:
            raise ConstraintConflict(
                f"faces {a} and {b} are both must-linked (through must-link sets sharing "
                "faces) and cannot-linked; resolve which correction wins before grouping"
            )
        pairs.append((min(a, b), max(a, b)))
    if linked.any():
        # Faces of one photo in two must-link components: the components may not merge.
        members = np.flatnonzero(linked)
        order = members[np.argsort(photo_index[members], kind="stable")]
        photos = photo_index[order]
        for start, stop in _runs(photos):
            for x in range(start, stop):
                for y in range(x + 1, stop):
                    a, b = int(order[x]), int(order[y])
                    pairs.append((min(a, b), max(a, b)))
    cannot = np.array(sorted(set(pairs)), np.int64).reshape(-1, 2)
    return Constraints(anchor, cannot)


def _runs(values: NDArray[np.int64]) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal values longer than one in a sorted array."""
    if len(values) == 0:
        return []
    edges = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(values)]])
    return [(int(a), int(b)) for a, b in zip(starts, stops, strict=True) if b - a > 1]


def no_constraints(n: int) -> Constraints:
    """Constraints that constrain nothing, for `n` faces."""
    return Constraints(np.full(n, -1, np.int64), np.zeros((0, 2), np.int64))


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
    return {"seed": 0.45, "default": 0.34, "attach": 0.25}.get(method, 0.34)


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


SHARED_PHOTO_MIN_GROUP = 8
"""Faces both groups need before a merge may tolerate shared photos (see `_average_linkage`)."""

SHARED_PHOTO_SHARE = 0.25
"""At most this share of the smaller group's faces may have a face of the same photo in the
other group for the two to merge."""


def _shared_photo_limit(
    size: NDArray[np.float64], other: NDArray[np.float64]
) -> NDArray[np.float64]:
    """How many same-photo face pairs a merge of groups of `size` and `other` faces tolerates."""
    smaller = np.minimum(size, other)
    return np.where(smaller >= SHARED_PHOTO_MIN_GROUP, np.floor(SHARED_PHOTO_SHARE * smaller), 0.0)


def _average_linkage(
    sim: NDArray[np.float64],
    shared: NDArray[np.floating],
    threshold: float,
    start: NDArray[np.int64] | None = None,
    cannot: NDArray[np.int64] | None = None,
) -> NDArray[np.int64]:
    """Cluster ids (0..k-1, by first face) from constrained average-linkage merging.

    Repeatedly merges the two clusters with the highest mean pairwise similarity, as long
    as it is above `threshold` and they share no photo. `shared[a, b]` is 1 where faces a and
    b come from one photo. Two big groups (`SHARED_PHOTO_MIN_GROUP` faces each) may still merge
    when only a few of their photos are shared (`SHARED_PHOTO_SHARE` of the smaller): one person
    twice in a photo (a collage, a mirror, a photo of a photo) must not split that person in
    two. The caller then keeps one face per photo in each group (`_one_face_per_photo`).

    Keeps, per cluster, the sum of its similarities to every other cluster and its best
    partner, so a merge costs O(m) plus the rows whose best partner it touched (instead of
    a full O(m^2) scan): a 3000-face trip groups in well under a second.

    `start` (m,): the initial cluster of each face (0..c-1; must-link sets), instead of one
    cluster per face; `cannot` (k, 2): face pairs whose clusters may never merge.
    """
    if start is None:
        m = sim.shape[0]
        total = np.array(sim, np.float64, copy=True)
        pairs = np.array(shared, np.float64, copy=True)
        np.fill_diagonal(pairs, 0.0)
        sizes = np.ones(m)
    else:
        m = int(start.max()) + 1
        member = np.zeros((sim.shape[0], m))
        member[np.arange(sim.shape[0]), start] = 1.0
        total = member.T @ np.asarray(sim, np.float64) @ member
        pairs = member.T @ np.asarray(shared, np.float64) @ member
        np.fill_diagonal(pairs, 0.0)
        sizes = member.sum(axis=0)
    forbid = None
    if cannot is not None and len(cannot):
        forbid = np.zeros((m, m), bool)
        ends = cannot if start is None else start[cannot]
        forbid[ends[:, 0], ends[:, 1]] = forbid[ends[:, 1], ends[:, 0]] = True
    alive = np.ones(m, bool)
    limit = _shared_photo_limit(sizes[:, None], sizes[None, :])
    score = np.where(pairs > limit, -np.inf, total / np.outer(sizes, sizes))
    if forbid is not None:
        score[forbid] = -np.inf
    np.fill_diagonal(score, -np.inf)
    best = np.argmax(score, axis=1)
    best_score = score[np.arange(m), best]
    owner = np.arange(m)
    while m > 1:
        i = int(np.argmax(best_score))
        if not best_score[i] > threshold:
            break
        i, j = sorted((i, int(best[i])))
        total[i, :] += total[j, :]
        total[:, i] = total[i, :]
        pairs[i, :] += pairs[j, :]
        pairs[:, i] = pairs[i, :]
        pairs[i, i] = 0.0
        sizes[i] += sizes[j]
        alive[j] = False
        owner[owner == j] = i
        row = total[i] / (sizes[i] * sizes)
        row[(pairs[i] > _shared_photo_limit(sizes[i], sizes)) | ~alive] = -np.inf
        if forbid is not None:
            forbid[i, :] |= forbid[j, :]
            forbid[:, i] = forbid[i, :]
            row[forbid[i]] = -np.inf
        row[i] = -np.inf
        score[i, :] = row
        score[:, i] = row
        score[j, :] = -np.inf
        score[:, j] = -np.inf
        best_score[j] = -np.inf
        # Rows whose best partner was i or j must look again; others only compare with i.
        stale = np.flatnonzero(alive & ((best == i) | (best == j)))
        for k in stale:
            best[k] = int(np.argmax(score[k]))
            best_score[k] = score[k, best[k]]
        better = alive & (row > best_score)
        best[better] = i
        best_score[better] = row[better]
        best[i] = int(np.argmax(score[i]))
        best_score[i] = score[i, best[i]]
    if start is not None:
        owner = owner[start]
    _, ids = np.unique(owner, return_inverse=True)
    return ids.astype(np.int64)


def _one_face_per_photo(
    sim: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    labels: NDArray[np.int64],
    pinned: NDArray[np.bool_] | None = None,
) -> NDArray[np.int64]:
    """In each group, of the faces that share a photo only the one most similar on average to
    the group's other photos stays (a `pinned`, must-linked, face always: there is at most one
    per photo in a group); the rest leave the group (-1), as does a group left with a single
    face."""
    out = labels.copy()
    for label in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == label)
        photos = photo_index[members]
        shared, counts = np.unique(photos, return_counts=True)
        for photo in shared[counts > 1]:
            faces = members[photos == photo]
            rest = members[photos != photo]
            if pinned is not None and pinned[faces].any():
                keep = faces[np.flatnonzero(pinned[faces])[0]]
            elif len(rest):
                keep = faces[int(np.argmax(sim[np.ix_(faces, rest)].mean(axis=1)))]
            else:
                keep = faces[0]
            out[faces[faces != keep]] = -1
    ids, counts = np.unique(out[out >= 0], return_counts=True)
    out[np.isin(out, ids[counts < 2])] = -1
    return out


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


def _core_groups(
    sim: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    threshold: float,
    strong: NDArray[np.bool_],
    constraints: Constraints,
) -> NDArray[np.int64]:
    """Stage 1: constrained average linkage of the `strong` faces at `threshold`; groups of
    one face, and weak faces, get -1. Must-linked faces count as strong, and each must-link
    component starts as one cluster."""
    n = sim.shape[0]
    labels = np.full(n, -1, np.int64)
    anchor = constraints.anchor
    pinned = anchor >= 0
    strong = strong | pinned
    # Faces that share no edge above the threshold can never merge: cluster each
    # connected component of the threshold graph on its own (keeps big trips tractable).
    # Weak faces have no edges, so they can neither found a group nor bridge two.
    edges = (sim > threshold) & strong[:, None] & strong[None, :]
    if pinned.any():
        faces = np.flatnonzero(pinned)
        order = faces[np.argsort(anchor[faces], kind="stable")]
        same = anchor[order[1:]] == anchor[order[:-1]]
        edges[order[1:][same], order[:-1][same]] = True
    n_comp, component = connected_components(csr_matrix(edges), directed=False)
    next_label = 0
    for comp in range(n_comp):
        members = np.flatnonzero(component == comp)
        if len(members) < 2:
            continue
        block = sim[np.ix_(members, members)].astype(np.float64)
        photos = photo_index[members]
        shared = photos[:, None] == photos[None, :]
        if pinned.any():
            # A must-linked face and an unlinked one of the same photo do not keep their
            # clusters apart: the unlinked one leaves afterwards (`_one_face_per_photo`).
            shared &= pinned[members][:, None] == pinned[members][None, :]
        start, cannot = _local_constraints(members, constraints)
        ids = _average_linkage(block, shared, threshold, start=start, cannot=cannot)
        for cid in np.unique(ids):
            faces = members[ids == cid]
            if len(faces) >= 2:
                labels[faces] = next_label
                next_label += 1
    return _one_face_per_photo(sim, photo_index, labels, pinned if pinned.any() else None)


def _local_constraints(
    members: NDArray[np.int64], constraints: Constraints
) -> tuple[NDArray[np.int64] | None, NDArray[np.int64] | None]:
    """The constraints of one component (`members`, sorted face indices) in its own indices:
    the initial cluster of each member (None: one each) and its cannot-link pairs (None)."""
    anchor = constraints.anchor[members]
    start = None
    if (anchor >= 0).any():
        key = np.where(anchor >= 0, anchor, -1 - np.arange(len(members)))
        _, start = np.unique(key, return_inverse=True)
        start = start.astype(np.int64)
    cannot = None
    if len(constraints.cannot):
        inside = np.isin(constraints.cannot, members).all(axis=1)
        if inside.any():
            cannot = np.searchsorted(members, constraints.cannot[inside])
    return start, cannot


MIN_DETECTION_SCORE: dict[str, float] = {"mtcnn": 0.9}
"""Per detector, the score a face needs to found or bridge a group (`cluster_faces`'s
`min_quality` when its `quality` is the detector's score). MTCNN's clear faces score 0.95-1.0,
while most of its 0.7-0.9 detections in the background of dev-set photos are hair, ears or
blurred faces that would otherwise pair up into "people"."""

ESTABLISHED_GROUP = 3
"""Faces a group needs to count as a person that smaller groups can join (Immich's `minFaces`
default is the same 3)."""


def _attach_small_groups(
    sim: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    labels: NDArray[np.int64],
    threshold: float,
    constraints: Constraints,
) -> NDArray[np.int64]:
    """Stage 2: faces left alone and pairs join, as a unit, the established group (3+ faces)
    they resemble most on average, if that mean similarity is above `threshold` and the group
    holds no face of their photos.

    A mean over a whole group is a steadier estimate than the one pair that stage 1 needed
    above its cut, so it can use a lower bar; loners never form new groups here, and units join
    strongest first so that a photo gives a group at most one face. A unit never joins a group
    that holds a face cannot-linked to one of its faces (including faces that joined earlier in
    this stage); a must-linked pair is a small group like any other, and joins as a whole.
    """
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    groups = ids[counts >= ESTABLISHED_GROUP]
    if len(groups) == 0:
        return labels
    # Units: every loner on its own, and every small group as a whole.
    small = np.isin(labels, ids[counts < ESTABLISHED_GROUP])
    faces = np.flatnonzero((labels < 0) | small)
    if len(faces) == 0:
        return labels
    unit_key = np.where(labels[faces] < 0, -1 - faces, labels[faces])
    _, unit = np.unique(unit_key, return_inverse=True)
    n_units = int(unit.max()) + 1
    member = (labels[:, None] == groups[None, :]).astype(np.float32)  # (n, k)
    sums = np.zeros((n_units, len(groups)))
    np.add.at(sums, unit, sim[faces] @ member)
    unit_size = np.bincount(unit, minlength=n_units).astype(np.float64)
    mean = sums / unit_size[:, None] / member.sum(axis=0)[None, :]
    photos_in = np.zeros((int(photo_index.max()) + 1, len(groups)), bool)
    grouped = np.isin(labels, groups)
    photos_in[photo_index[grouped], np.searchsorted(groups, labels[grouped])] = True
    # A must-linked face only gives way to a must-linked face of its photo in the group; an
    # unlinked face there leaves the group when it joins.
    pinned = constraints.anchor >= 0
    pinned_in = np.zeros_like(photos_in)
    held = grouped & pinned
    pinned_in[photo_index[held], np.searchsorted(groups, labels[held])] = True

    def blocked(unit_faces: NDArray[np.int64]) -> NDArray[np.bool_]:
        rows = photo_index[unit_faces]
        return np.where(pinned[unit_faces][:, None], pinned_in[rows], photos_in[rows])

    conflict = np.zeros((n_units, len(groups)), bool)
    np.logical_or.at(conflict, unit, blocked(faces))
    partners = constraints.cannot_partners()
    unit_of = np.full(len(labels), -1, np.int64)
    unit_of[faces] = unit
    for a, others in partners.items():
        if unit_of[a] >= 0:
            for b in others:
                if labels[b] in groups:
                    conflict[unit_of[a], np.searchsorted(groups, labels[b])] = True
    mean[conflict] = -np.inf
    choice = np.argmax(mean, axis=1)
    value = mean[np.arange(n_units), choice]
    out = labels.copy()
    for u in np.argsort(-value, kind="stable"):
        if not value[u] > threshold:
            break
        unit_faces = faces[unit == u]
        group = choice[u]
        if blocked(unit_faces)[:, group].any():
            continue  # a unit that joined before took this photo's place in the group
        if any(out[b] == groups[group] for a in unit_faces for b in partners.get(int(a), ())):
            continue  # a unit that joined before holds a face this one may not be with
        for face in unit_faces[pinned[unit_faces]]:
            if photos_in[photo_index[face], group]:
                gives_way = (out == groups[group]) & (photo_index == photo_index[face])
                out[gives_way] = -1
            pinned_in[photo_index[face], group] = True
        photos_in[photo_index[unit_faces], group] = True
        out[unit_faces] = groups[group]
    return out


def _default_clustering(
    sim: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    threshold: float,
    attach_threshold: float,
    strong: NDArray[np.bool_],
    constraints: Constraints,
) -> Clustering:
    labels = _core_groups(sim, photo_index, threshold, strong, constraints)
    labels = _attach_small_groups(sim, photo_index, labels, attach_threshold, constraints)
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
    attach_threshold: float | None = None,
    quality: NDArray[np.floating] | None = None,
    min_quality: float | None = None,
    must_link: Sequence[Sequence[int]] = (),
    cannot_link: Sequence[tuple[int, int]] = (),
) -> Clustering:
    """Group L2-normalised face embeddings (n, d); `photo_index` says which photo each face is in.

    `default`: constrained average linkage at `threshold` (the embedder's calibrated value when
    None), then faces left alone join the group they resemble on average above
    `attach_threshold` (when None: `threshold` minus the calibrated gap between the two).
    `quality` (n,) with `min_quality`, when both are given (e.g. the detector's scores and
    `MIN_DETECTION_SCORE[detector]`): faces under `min_quality` (blurred, cut off, or no face at
    all) never found or bridge a group in stage 1; they may still join an established group in
    stage 2.

    Constraints (face indices; a person's corrections, `default` only):
    - `must_link`: each set of faces ends in one group (label >= 0), whatever their similarity
      or quality: sets sharing a face are one set, which starts stage 1 as one cluster that
      average linkage grows but never splits; the one-face-per-photo rule never removes a
      must-linked face; a set still small after stage 1 may join an established group whole;
    - `cannot_link`: the two faces of a pair never end in one group (not by linkage, not by the
      shared-photo exception, not by attach).
    `ConstraintConflict` when they contradict each other (a pair both must- and cannot-linked,
    or two faces of one photo must-linked), `InvalidConstraint` for an unknown face index.
    Without constraints the result is exactly the unconstrained grouping.
    """
    if method not in METHODS:
        raise UnknownGroupingMethod(f"unknown grouping method {method!r}; use one of {METHODS}")
    n = embeddings.shape[0]
    photo_index = np.asarray(photo_index, np.int64)
    constraints = (
        resolve_constraints(n, photo_index, must_link, cannot_link)
        if len(must_link) or len(cannot_link)
        else no_constraints(n)
    )
    if method == "seed" and not constraints.empty:
        raise InvalidConstraint("the seed grouping takes no constraints; use method='default'")
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Clustering(empty, empty.copy(), np.zeros(0, np.float32))
    cut = default_threshold(method, embedder) if threshold is None else threshold
    sim = (embeddings @ embeddings.T).astype(np.float32)
    if method == "seed":
        return _seed_clustering(sim, cut)
    attach = cut - default_threshold("default", embedder) + default_threshold("attach", embedder)
    if attach_threshold is not None:
        attach = attach_threshold
    strong = np.ones(n, bool)
    if quality is not None and min_quality is not None:
        strong = np.asarray(quality) >= min_quality
    return _default_clustering(sim, photo_index, cut, attach, strong, constraints)
