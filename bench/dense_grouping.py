"""The first implementation of the default grouping, on a dense n x n similarity matrix.

Its linkage and attach stages as they were (the parts that hold the matrix); the one-face-per-
photo rule and the explanations are the product's own (`worker.cluster`).

Kept for the benchmarks only (`bench quality` compares it with the product's graph-based
`worker.cluster` in the same run, `bench scale` shows its memory): the product groups without
an n x n matrix. Same method, same constraints, same results up to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from worker.cluster import (
    ESTABLISHED_GROUP,
    Clustering,
    Constraints,
    _explain,
    _one_face_per_photo,
    _relabel_by_first_face,
    _shared_photo_limit,
    attach_threshold_for,
    default_threshold,
    no_constraints,
    resolve_constraints,
)


def dense_cluster_faces(
    embeddings: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    *,
    threshold: float | None = None,
    embedder: str = "w600k_mbf",
    attach_threshold: float | None = None,
    quality: NDArray[np.floating] | None = None,
    min_quality: float | None = None,
    must_link: Sequence[Sequence[int]] = (),
    cannot_link: Sequence[tuple[int, int]] = (),
) -> Clustering:
    """`worker.cluster.cluster_faces(method="default")` as it was, with its n x n matrix."""
    n = embeddings.shape[0]
    photo_index = np.asarray(photo_index, np.int64)
    constraints = (
        resolve_constraints(n, photo_index, must_link, cannot_link)
        if len(must_link) or len(cannot_link)
        else no_constraints(n)
    )
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Clustering(empty, empty.copy(), np.zeros(0, np.float32))
    cut = default_threshold("default", embedder) if threshold is None else threshold
    attach = attach_threshold_for(cut, embedder, attach_threshold)
    sim = (embeddings @ embeddings.T).astype(np.float32)
    strong = np.ones(n, bool)
    if quality is not None and min_quality is not None:
        strong = np.asarray(quality) >= min_quality
    labels = _core_groups(sim, embeddings, photo_index, cut, strong, constraints)
    labels = _attach_small_groups(sim, photo_index, labels, attach, constraints)
    labels = _relabel_by_first_face(labels)
    matched, similarity = _explain(embeddings, labels)
    return Clustering(labels, matched, similarity)


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


def _core_groups(
    sim: NDArray[np.float32],
    embeddings: NDArray[np.float32],
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
    return _one_face_per_photo(embeddings, photo_index, labels, pinned if pinned.any() else None)


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


def _attach_small_groups(
    sim: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    labels: NDArray[np.int64],
    threshold: float,
    constraints: Constraints,
) -> NDArray[np.int64]:
    """Stage 2 as `worker.cluster._attach_small_groups` (same rules), from the full matrix:
    sums of similarities of each unit to each established group."""
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
