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

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import csr_matrix

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


MIN_DETECTION_SCORE: dict[str, float] = {"mtcnn": 0.9}
"""Per detector, the score a face needs to found or bridge a group (`cluster_faces`'s
`min_quality` when its `quality` is the detector's score). MTCNN's clear faces score 0.95-1.0,
while most of its 0.7-0.9 detections in the background of dev-set photos are hair, ears or
blurred faces that would otherwise pair up into "people"."""

ESTABLISHED_GROUP = 3
"""Faces a group needs to count as a person that smaller groups can join (Immich's `minFaces`
default is the same 3)."""

NEIGHBOURS = 64
"""Per face, at most this many of its most similar faces (those above the cut) are edges of
the similarity graph (`similarity_graph`). Grouping is exact while no face has more
neighbours above the cut than this; docs/scaling.md."""

EXACT_GRAPH_LIMIT = 100_000
"""Up to this many faces the graph is computed exactly (every similarity, blockwise), so the
grouping is the dense one's; above it, with `index="auto"`, from cells (`CELL_*`). On 2 cores
the exact graph of 20,000 faces takes 1.4 s, of 100,000 35 s (the whole grouping 42 s, within
the 60 s goal; docs/scaling.md)."""

GRAPH_BLOCK_BYTES = 64 << 20
"""Memory for one block of similarities while the graph is computed."""

CELL_SIZE = 160
"""Cells index: faces per cell on average (cells = faces / CELL_SIZE)."""

CELL_PROBES = 16
"""Cells index: how many of its nearest cells each face is compared in, at least."""

CELL_PROBE_SHARE = 0.1
"""Cells index: the share of all cells each face is compared in, when that is more than
`CELL_PROBES`. A fixed number of probes covers a smaller share of the faces as cells are
added, and misses more pairs above the cut (100,000 faces, 625 cells: 95.2 % of the exact
graph's edges with 16 probes, 99.6 % with 63); a fixed share keeps the recall."""

CELL_FILED = 2
"""Cells index: in how many of its nearest cells each face is filed."""

CELL_ROUNDS = 4
"""Cells index: rounds of spherical k-means that place the cells."""

GRAPH_INDEXES = ("auto", "exact", "cells")


class UnknownGraphIndex(ValueError):
    """The similarity graph's index is not one of `GRAPH_INDEXES`."""


@dataclass(frozen=True)
class SimilarityGraph:
    """Face pairs (a < b) above the cut, each face keeping its `NEIGHBOURS` most similar, and
    their cosine similarities; `index` says how they were found."""

    a: NDArray[np.int64]
    b: NDArray[np.int64]
    similarity: NDArray[np.float32]
    index: str


def similarity_graph(
    embeddings: NDArray[np.float32],
    threshold: float,
    *,
    active: NDArray[np.bool_] | None = None,
    neighbours: int = NEIGHBOURS,
    index: str = "auto",
) -> SimilarityGraph:
    """The edges stage 1 may merge along: for each `active` face, its (at most `neighbours`)
    most similar active faces with a similarity above `threshold`, as undirected pairs.

    `exact` computes every similarity, a block of rows at a time (memory grows with the number
    of faces, time with its square); `cells` (an inverted file, as in faiss's IVF, on matrix
    products) places `faces / CELL_SIZE` cells by spherical k-means, files each face in its
    `CELL_FILED` nearest cells, and compares each face with the faces filed in its
    `cell_probes` nearest cells (a tenth of them, at least `CELL_PROBES`): time grows with
    faces x probes x CELL_FILED x CELL_SIZE, but a pair of faces above the cut
    whose cells are far apart is missed (docs/scaling.md measures how often). `auto` is exact up
    to `EXACT_GRAPH_LIMIT` faces.
    """
    if index not in GRAPH_INDEXES:
        raise UnknownGraphIndex(f"unknown similarity graph index {index!r}; use {GRAPH_INDEXES}")
    n = embeddings.shape[0]
    faces = np.arange(n) if active is None else np.flatnonzero(active)
    if index == "auto":
        index = "exact" if len(faces) <= EXACT_GRAPH_LIMIT else "cells"
    x = np.ascontiguousarray(embeddings[faces], np.float32)
    if len(faces) < 2:
        rows, cols, vals = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    elif index == "exact":
        rows, cols, vals = _exact_neighbours(x, threshold)
    else:
        rows, cols, vals = _cell_neighbours(x, threshold)
    # Each pair once, then (only if some face has more) each face's best `neighbours`.
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    key, first = np.unique(lo * n + hi, return_index=True)
    a, b, vals = key // n, key % n, vals[first]
    if len(a) and np.bincount(np.concatenate([a, b])).max() > neighbours:
        ends = np.concatenate([a, b])
        order = np.lexsort((-np.concatenate([vals, vals]), ends))
        ranked = np.empty(len(ends), bool)
        ranked[order] = _top_per_row(ends[order], neighbours)
        keep = ranked[: len(a)] | ranked[len(a) :]
        a, b, vals = a[keep], b[keep], vals[keep]
    return SimilarityGraph(faces[a], faces[b], vals.astype(np.float32), index)


def _top_per_row(rows: NDArray[np.int64], k: int) -> NDArray[np.bool_]:
    """Which entries are among the first `k` of their row (rows sorted, best first)."""
    starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]])) if len(rows) else rows
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(rows)]])))
    return rank < k


def _pairs_above(
    q: NDArray[np.float32], x: NDArray[np.float32], threshold: float
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """(i, j, similarity) of the pairs of rows of `q` and `x` above `threshold`."""
    block = q @ x.T
    r, c = np.nonzero(block > threshold)
    return r, c, block[r, c]


def _exact_neighbours(
    x: NDArray[np.float32], threshold: float
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Every pair above the threshold (each once, i < j): blocks of rows against the rows
    after them."""
    m = x.shape[0]
    step = max(1, GRAPH_BLOCK_BYTES // (4 * m))
    parts = []
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        r, c, v = _pairs_above(x[lo:hi], x[lo:], threshold)
        later = c > r
        parts.append((r[later] + lo, c[later] + lo, v[later]))
    return _joined(parts)


def _joined(
    parts: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]],
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (
        np.concatenate([p[0] for p in parts]).astype(np.int64),
        np.concatenate([p[1] for p in parts]).astype(np.int64),
        np.concatenate([p[2] for p in parts]).astype(np.float32),
    )


def cell_probes(cells: int) -> int:
    """How many of its nearest cells a face is compared in, out of `cells`: `CELL_PROBES`, or
    `CELL_PROBE_SHARE` of them once that is more (all of them when there are fewer)."""
    return min(cells, max(CELL_PROBES, math.ceil(cells * CELL_PROBE_SHARE)))


def _cell_neighbours(
    x: NDArray[np.float32], threshold: float
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """Pairs above the threshold among faces filed in the cells each face probes."""
    m = x.shape[0]
    centroids = _spherical_kmeans(x, max(1, m // CELL_SIZE))
    cells = centroids.shape[0]
    probes = cell_probes(cells)
    near = np.empty((m, probes), np.int64)
    step = max(1, GRAPH_BLOCK_BYTES // (4 * cells))
    for lo in range(0, m, step):
        sims = x[lo : lo + step] @ centroids.T
        if probes < cells:
            part = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
            rank = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
            near[lo : lo + step] = np.take_along_axis(part, rank, axis=1)
        else:
            near[lo : lo + step] = np.argsort(-sims, axis=1)
    # Each face is filed in its CELL_FILED nearest cells and probes its `probes` nearest.
    filed_in = min(CELL_FILED, probes)
    home = near[:, :filed_in].ravel()
    filed = np.argsort(home, kind="stable")
    filed_start = np.searchsorted(home[filed], np.arange(cells + 1))
    filed = filed // filed_in
    probe_cell = near.ravel()
    probing = np.argsort(probe_cell, kind="stable")
    probe_start = np.searchsorted(probe_cell[probing], np.arange(cells + 1))
    parts = []
    for cell in range(cells):
        members = filed[filed_start[cell] : filed_start[cell + 1]]
        queries = probing[probe_start[cell] : probe_start[cell + 1]] // probes
        if len(members) == 0 or len(queries) == 0:
            continue
        r, c, v = _pairs_above(x[queries], x[members], threshold)
        q, f = queries[r], members[c]
        other = q != f
        parts.append((q[other], f[other], v[other]))
    return _joined(parts)


def _home(x: NDArray[np.float32], centroids: NDArray[np.float32]) -> NDArray[np.int64]:
    """The nearest centroid of each row, a block of rows at a time."""
    out = np.empty(x.shape[0], np.int64)
    step = max(1, GRAPH_BLOCK_BYTES // (4 * centroids.shape[0]))
    for lo in range(0, x.shape[0], step):
        out[lo : lo + step] = np.argmax(x[lo : lo + step] @ centroids.T, axis=1)
    return out


def _spherical_kmeans(x: NDArray[np.float32], k: int) -> NDArray[np.float32]:
    """`k` unit centroids placed by spherical k-means (fixed seed: the same faces, the same
    cells), on a sample of at most 64 faces per centroid."""
    rng = np.random.default_rng(0)
    sample = x if len(x) <= 64 * k else x[rng.choice(len(x), 64 * k, replace=False)]
    centroids = sample[rng.choice(len(sample), k, replace=False)].copy()
    for _ in range(CELL_ROUNDS):
        owner = _home(sample, centroids)
        member = csr_matrix(
            (np.ones(len(sample), np.float32), (owner, np.arange(len(sample)))),
            shape=(k, len(sample)),
        )
        sums = np.asarray(member @ sample, np.float32)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        empty = norms[:, 0] == 0
        sums[empty] = sample[rng.choice(len(sample), int(empty.sum()))]
        norms[empty] = 1.0
        centroids = (sums / norms).astype(np.float32)
    return centroids


def _same_photo_pairs(photo_index: NDArray[np.int64]) -> tuple[NDArray[np.int64], ...]:
    """Every ordered pair (a, b), a != b, of faces in one photo."""
    order = np.argsort(photo_index, kind="stable")
    photos = photo_index[order]
    cuts = np.flatnonzero(np.diff(photos)) + 1
    starts = np.concatenate([[0], cuts])
    lengths = np.diff(np.concatenate([starts, [len(photos)]]))
    run_start = np.repeat(starts, lengths)
    run_len = np.repeat(lengths, lengths)
    multi = np.flatnonzero(run_len > 1)
    pos = np.repeat(multi, run_len[multi])
    offset = np.arange(len(pos)) - np.repeat(
        np.cumsum(run_len[multi]) - run_len[multi], run_len[multi]
    )
    other = run_start[pos] + offset
    keep = other != pos
    return order[pos[keep]], order[other[keep]]


class _GraphLinkage:
    """Constrained average linkage on a similarity graph, without an n x n matrix.

    The mean similarity of two groups is the dot product of their embedding sums divided by
    both sizes (cosine similarity of unit vectors is their dot product), so each group keeps
    only its sum: the means are exact. The graph only says which pairs of groups may be
    compared: two groups with a mean above the cut always have a pair of faces above it, so with
    the whole threshold graph nothing is missed. Merges happen in the same order as with the
    dense matrix: always the pair with the highest mean (ties: lowest face indices), held in a
    heap whose stale entries are skipped.
    """

    def __init__(
        self,
        embeddings: NDArray[np.float32],
        photo_index: NDArray[np.int64],
        graph: SimilarityGraph,
        threshold: float,
        constraints: Constraints,
    ) -> None:
        n = embeddings.shape[0]
        self.threshold = threshold
        self.parent = list(range(n))
        self.size = [1] * n
        self.version = [0] * n  # -1: merged into another group
        self.sums = np.asarray(embeddings, np.float64).copy()
        pinned = constraints.anchor >= 0
        nodes = np.zeros(n, bool)
        nodes[graph.a] = nodes[graph.b] = True
        nodes |= pinned
        self.adjacency = _lists(
            n, np.concatenate([graph.a, graph.b]), np.concatenate([graph.b, graph.a])
        )
        a, b = _same_photo_pairs(photo_index)
        # Same-photo pairs count against a merge (`_shared_photo_limit`) between faces that can
        # group, except a must-linked face against an unlinked one: that one leaves afterwards.
        keep = nodes[a] & nodes[b] & (pinned[a] == pinned[b])
        self.base_shared = _lists(n, a[keep], b[keep])
        cannot = constraints.cannot
        self.base_cannot = _lists(
            n,
            np.concatenate([cannot[:, 0], cannot[:, 1]]),
            np.concatenate([cannot[:, 1], cannot[:, 0]]),
        )
        self.neighbours: dict[int, set[int]] = {}
        self.shared: dict[int, dict[int, int]] = {}
        self.cannot: dict[int, set[int]] = {}
        self.heap: list[tuple[float, int, int, int, int]] = []
        # Must-link components start as one group each.
        anchor = constraints.anchor
        for comp_faces in _groups_of(anchor):
            root = int(comp_faces[0])
            for face in comp_faces[1:]:
                self._merge(root, int(face))  # faces in order: `root` stays the lowest
        for root in {self.find(int(f)) for f in np.flatnonzero(pinned)}:
            self._push_scores(root)
        # Pairs of single faces: the graph's own similarities, best first.
        single = (anchor[graph.a] < 0) & (anchor[graph.b] < 0) & (graph.similarity > threshold)
        single &= photo_index[graph.a] != photo_index[graph.b]
        if len(cannot):
            banned = np.isin(graph.a * n + graph.b, cannot[:, 0] * n + cannot[:, 1])
            single &= ~banned
        sa, sb = graph.a[single], graph.b[single]
        sv = graph.similarity[single].astype(np.float64)
        order = np.lexsort((sb, sa, -sv))
        self.stream = (sv[order].tolist(), sa[order].tolist(), sb[order].tolist())

    def find(self, face: int) -> int:
        parent = self.parent
        root = face
        while parent[root] != root:
            root = parent[root]
        while parent[face] != root:
            parent[face], face = root, parent[face]
        return root

    def _neighbours_of(self, c: int) -> set[int]:
        got = self.neighbours.pop(c, None)
        if got is None:
            got = set(self.adjacency[c])
        return got

    def _shared_of(self, c: int) -> dict[int, int]:
        got = self.shared.pop(c, None)
        if got is None:
            got = {}
            for face in self.base_shared[c]:
                got[face] = got.get(face, 0) + 1
        return got

    def _cannot_of(self, c: int) -> set[int]:
        got = self.cannot.pop(c, None)
        return set(self.base_cannot[c]) if got is None else got

    def _merge(self, i: int, j: int) -> int:
        """Join groups i and j (roots) into the lower one; its neighbours, shared photos and
        cannot-links are the union of both, in ids that `_push_scores` resolves."""
        i, j = min(i, j), max(i, j)
        self.parent[j] = i
        self.size[i] += self.size[j]
        self.sums[i] += self.sums[j]
        self.version[i] += 1
        self.version[j] = -1
        near, other = self._neighbours_of(i), self._neighbours_of(j)
        if len(near) < len(other):
            near, other = other, near
        near |= other
        self.neighbours[i] = near
        if self.shared or self.base_shared[i] or self.base_shared[j]:
            shared, extra = self._shared_of(i), self._shared_of(j)
            if shared or extra:
                for c, count in extra.items():
                    shared[c] = shared.get(c, 0) + count
                self.shared[i] = shared
        if self.cannot or self.base_cannot[i] or self.base_cannot[j]:
            cannot = self._cannot_of(i) | self._cannot_of(j)
            if cannot:
                self.cannot[i] = cannot
        return i

    def _push_scores(self, i: int) -> None:
        """Put group i's pairs with each neighbouring group above the cut into the heap."""
        find = self.find
        near = {find(c) for c in self.neighbours.get(i, ())}
        near.discard(i)
        self.neighbours[i] = near
        if not near:
            return
        shared: dict[int, int] = {}
        if i in self.shared:
            for c, count in self.shared[i].items():
                root = find(c)
                shared[root] = shared.get(root, 0) + count
            shared.pop(i, None)
            self.shared[i] = shared
        cannot: set[int] = set()
        if i in self.cannot:
            cannot = self.cannot[i] = {find(c) for c in self.cannot[i]}
        others = list(near)
        size = self.size
        sizes = np.array([size[c] for c in others], np.float64)
        scores = (self.sums[others] @ self.sums[i]) / (size[i] * sizes)
        above = np.flatnonzero(scores > self.threshold)
        if len(above) == 0:
            return
        version, heap, size_i = self.version, self.heap, size[i]
        for k, score in zip(above.tolist(), scores[above].tolist(), strict=True):
            c = others[k]
            if c in cannot:
                continue
            if c in shared:
                smaller = min(size_i, size[c])
                limit = (
                    int(SHARED_PHOTO_SHARE * smaller) if smaller >= SHARED_PHOTO_MIN_GROUP else 0
                )
                if shared[c] > limit:
                    continue
            a, b = (i, c) if i < c else (c, i)
            heapq.heappush(heap, (-score, a, b, version[a], version[b]))

    def run(self) -> list[int]:
        """Merge until no pair of groups is above the cut; the group (root face) of each face."""
        heap, version = self.heap, self.version
        values, firsts, seconds = self.stream
        at, end = 0, len(values)
        while True:
            while at < end and (version[firsts[at]] != 0 or version[seconds[at]] != 0):
                at += 1
            while heap and (version[heap[0][1]] != heap[0][3] or version[heap[0][2]] != heap[0][4]):
                heapq.heappop(heap)
            if at < end and (not heap or (-values[at], firsts[at], seconds[at]) < heap[0][:3]):
                i, j = firsts[at], seconds[at]
                at += 1
            elif heap:
                _, i, j, _, _ = heapq.heappop(heap)
            else:
                break
            self._push_scores(self._merge(i, j))
        return [self.find(f) for f in range(len(self.parent))]


def _lists(n: int, src: NDArray[np.int64], dst: NDArray[np.int64]) -> list[list[int]]:
    """For each of `n` nodes, the `dst` of the pairs whose `src` it is."""
    out: list[list[int]] = [[] for _ in range(n)]
    for s, d in zip(src.tolist(), dst.tolist(), strict=True):
        out[s].append(d)
    return out


def _groups_of(labels: NDArray[np.int64]) -> list[NDArray[np.int64]]:
    """The faces of each label >= 0 (sorted), in label order."""
    faces = np.flatnonzero(labels >= 0)
    order = faces[np.argsort(labels[faces], kind="stable")]
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, cuts) if len(order) else []


def _core_groups(
    embeddings: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    threshold: float,
    strong: NDArray[np.bool_],
    constraints: Constraints,
    graph: SimilarityGraph,
) -> NDArray[np.int64]:
    """Stage 1: constrained average linkage of the `strong` faces at `threshold` along the
    graph; groups of one face, and weak faces, get -1. Must-linked faces count as strong, and
    each must-link component starts as one group."""
    n = embeddings.shape[0]
    root = np.asarray(_GraphLinkage(embeddings, photo_index, graph, threshold, constraints).run())
    sizes = np.bincount(root, minlength=n)
    labels = np.where(sizes[root] >= 2, root, -1)
    _, dense = np.unique(labels, return_inverse=True)
    labels = np.where(labels >= 0, dense - (1 if (labels < 0).any() else 0), -1)
    pinned = constraints.anchor >= 0
    return _one_face_per_photo(embeddings, photo_index, labels, pinned if pinned.any() else None)


def _one_face_per_photo(
    embeddings: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    labels: NDArray[np.int64],
    pinned: NDArray[np.bool_] | None = None,
) -> NDArray[np.int64]:
    """In each group, of the faces that share a photo only the one most similar on average to
    the group's other photos stays (a `pinned`, must-linked, face always: there is at most one
    per photo in a group); the rest leave the group (-1), as does a group left with a single
    face."""
    out = labels.copy()
    grouped = np.flatnonzero(labels >= 0)
    key = labels[grouped] * (int(photo_index.max()) + 1) + photo_index[grouped]
    uniq, counts = np.unique(key, return_counts=True)
    crowded = np.unique(labels[grouped][np.isin(key, uniq[counts > 1])])
    for label in crowded:
        members = np.flatnonzero(labels == label)
        photos = photo_index[members]
        shared, counts = np.unique(photos, return_counts=True)
        for photo in shared[counts > 1]:
            faces = members[photos == photo]
            rest = members[photos != photo]
            if pinned is not None and pinned[faces].any():
                keep = faces[np.flatnonzero(pinned[faces])[0]]
            elif len(rest):
                sim = (embeddings[faces] @ embeddings[rest].T).astype(np.float32)
                keep = faces[int(np.argmax(sim.mean(axis=1)))]
            else:
                keep = faces[0]
            out[faces[faces != keep]] = -1
    ids, counts = np.unique(out[out >= 0], return_counts=True)
    out[np.isin(out, ids[counts < 2])] = -1
    return out


def _explain(
    embeddings: NDArray[np.float32], labels: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """For each grouped face, its most similar face in the same group and that similarity."""
    n = len(labels)
    matched = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float32)
    for members in _groups_of(labels):
        x = embeddings[members]
        block = (x @ x.T).astype(np.float32)
        np.fill_diagonal(block, -np.inf)
        best = np.argmax(block, axis=1)
        matched[members] = members[best]
        similarity[members] = block[np.arange(len(members)), best]
    return matched, similarity


ATTACH_BLOCK = 2048
"""Units (loners and small groups) whose mean similarity to every group is computed at once."""


def _attach_small_groups(
    embeddings: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    labels: NDArray[np.int64],
    threshold: float,
    constraints: Constraints,
    small_faces: NDArray[np.bool_] | None = None,
    small_threshold: float | None = None,
) -> NDArray[np.int64]:
    """Stage 2: faces left alone and pairs join, as a unit, the established group (3+ faces)
    they resemble most on average, if that mean similarity is above `threshold` and the group
    holds no face of their photos.

    A mean over a whole group is a steadier estimate than the one pair that stage 1 needed
    above its cut, so it can use a lower bar; loners never form new groups here, and units join
    strongest first so that a photo gives a group at most one face. A unit never joins a group
    that holds a face cannot-linked to one of its faces (including faces that joined earlier in
    this stage); a must-linked pair is a small group like any other, and joins as a whole, and
    takes the place of an unlinked face of its photo in the group.

    The means come from embedding sums (unit sum . group sum / sizes), a block of units at a
    time: memory grows with units x groups per block, never with faces squared. A unit of
    `small_faces` only needs `small_threshold` instead.
    """
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    groups = ids[counts >= ESTABLISHED_GROUP]
    if len(groups) == 0:
        return labels
    small = np.isin(labels, ids[counts < ESTABLISHED_GROUP])
    faces = np.flatnonzero((labels < 0) | small)
    if len(faces) == 0:
        return labels
    n = len(labels)
    unit_key = np.where(labels[faces] < 0, -1 - faces, labels[faces])
    _, unit = np.unique(unit_key, return_inverse=True)
    n_units = int(unit.max()) + 1
    unit_of = np.full(n, -1, np.int64)
    unit_of[faces] = unit
    grouped = np.isin(labels, groups)
    group_of = np.full(n, -1, np.int64)
    group_of[grouped] = np.searchsorted(groups, labels[grouped])
    unit_sums = _sums(embeddings, unit_of, n_units)
    group_sums = _sums(embeddings, group_of, len(groups))
    unit_size = np.bincount(unit, minlength=n_units).astype(np.float64)
    group_size = np.bincount(group_of[grouped], minlength=len(groups)).astype(np.float64)
    # Units that may not join a group: one of its photos is there (for a must-linked face:
    # a must-linked face of its photo), or a face cannot-linked to one of its faces.
    pinned = constraints.anchor >= 0
    a, b = _same_photo_pairs(photo_index)
    blocks = (unit_of[a] >= 0) & (group_of[b] >= 0) & (~pinned[a] | pinned[b])
    cannot = constraints.cannot
    ca = np.concatenate([cannot[:, 0], cannot[:, 1]])
    cb = np.concatenate([cannot[:, 1], cannot[:, 0]])
    no_join = (unit_of[ca] >= 0) & (group_of[cb] >= 0)
    bad_unit = np.concatenate([unit_of[a[blocks]], unit_of[ca[no_join]]])
    bad_group = np.concatenate([group_of[b[blocks]], group_of[cb[no_join]]])
    choice = np.zeros(n_units, np.int64)
    value = np.zeros(n_units)
    for lo in range(0, n_units, ATTACH_BLOCK):
        hi = min(n_units, lo + ATTACH_BLOCK)
        mean = unit_sums[lo:hi] @ group_sums.T / unit_size[lo:hi, None] / group_size[None, :]
        inside = (bad_unit >= lo) & (bad_unit < hi)
        mean[bad_unit[inside] - lo, bad_group[inside]] = -np.inf
        choice[lo:hi] = np.argmax(mean, axis=1)
        value[lo:hi] = mean[np.arange(hi - lo), choice[lo:hi]]
    # Joining, strongest first: what joined before may now block a unit.
    partners = constraints.cannot_partners()
    by_unit = np.argsort(unit, kind="stable")
    unit_start = np.concatenate([[0], np.cumsum(np.bincount(unit, minlength=n_units))])
    by_photo = np.argsort(photo_index, kind="stable")
    photo_start = np.searchsorted(photo_index[by_photo], np.arange(int(photo_index.max()) + 2))
    photos_in: set[tuple[int, int]] = set(
        zip(photo_index[grouped].tolist(), group_of[grouped].tolist(), strict=True)
    )
    held = grouped & pinned
    pinned_in: set[tuple[int, int]] = set(
        zip(photo_index[held].tolist(), group_of[held].tolist(), strict=True)
    )
    bar = np.full(n_units, threshold)
    if small_faces is not None and small_threshold is not None:
        big_units = np.unique(unit_of[faces[~small_faces[faces]]])
        bar[np.setdiff1d(np.arange(n_units), big_units)] = max(threshold, small_threshold)
    out = labels.copy()
    for u in np.argsort(-value, kind="stable").tolist():
        if not value[u] > threshold:
            break
        if not value[u] > bar[u]:
            continue
        unit_faces = faces[by_unit[unit_start[u] : unit_start[u + 1]]]
        group = int(choice[u])
        if any(
            (int(photo_index[f]), group) in (pinned_in if pinned[f] else photos_in)
            for f in unit_faces
        ):
            continue  # a unit that joined before took this photo's place in the group
        if any(out[b] == groups[group] for a in unit_faces for b in partners.get(int(a), ())):
            continue  # a unit that joined before holds a face this one may not be with
        for face in unit_faces[pinned[unit_faces]].tolist():
            photo = int(photo_index[face])
            if (photo, group) in photos_in:
                same = by_photo[photo_start[photo] : photo_start[photo + 1]]
                out[same[out[same] == groups[group]]] = -1
            pinned_in.add((photo, group))
        photos_in.update((int(photo_index[f]), group) for f in unit_faces)
        out[unit_faces] = groups[group]
    return out


def _sums(
    embeddings: NDArray[np.float32], owner: NDArray[np.int64], count: int
) -> NDArray[np.float64]:
    """(count, d) sums of the embeddings of the faces of each owner (faces with -1: none)."""
    faces = np.flatnonzero(owner >= 0)
    order = faces[np.argsort(owner[faces], kind="stable")]
    out = np.zeros((count, embeddings.shape[1]))
    if len(order) == 0:
        return out
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], owner[order]])))
    present = owner[order][starts]
    for lo in range(0, len(starts), 4096):
        hi = min(len(starts), lo + 4096)
        first, last = starts[lo], starts[hi] if hi < len(starts) else len(order)
        chunk = embeddings[order[first:last]].astype(np.float64)
        out[present[lo:hi]] = np.add.reduceat(chunk, starts[lo:hi] - first, axis=0)
    return out


def _default_clustering(
    embeddings: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    threshold: float,
    attach_threshold: float,
    strong: NDArray[np.bool_],
    constraints: Constraints,
    neighbours: int,
    index: str,
    small: NDArray[np.bool_] | None = None,
    tiny: NDArray[np.bool_] | None = None,
) -> Clustering:
    strong = strong | (constraints.anchor >= 0)
    graph = similarity_graph(
        embeddings, threshold, active=strong, neighbours=neighbours, index=index
    )
    if small is not None and small.any():
        both = small[graph.a] & small[graph.b]
        graph = SimilarityGraph(
            graph.a[~both], graph.b[~both], graph.similarity[~both], graph.index
        )
    labels = _core_groups(embeddings, photo_index, threshold, strong, constraints, graph)
    del graph
    labels = _attach_small_groups(
        embeddings, photo_index, labels, attach_threshold, constraints, tiny, threshold
    )
    labels = _relabel_by_first_face(labels)
    matched, similarity = _explain(embeddings, labels)
    return Clustering(labels, matched, similarity)


def attach_threshold_for(cut: float, embedder: str, attach_threshold: float | None) -> float:
    """The attach bar: `attach_threshold`, else `cut` minus the embedder's calibrated gap."""
    if attach_threshold is not None:
        return attach_threshold
    return cut - default_threshold("default", embedder) + default_threshold("attach", embedder)


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
    neighbours: int = NEIGHBOURS,
    index: str = "auto",
    small: NDArray[np.bool_] | None = None,
    tiny: NDArray[np.bool_] | None = None,
) -> Clustering:
    """Group L2-normalised face embeddings (n, d); `photo_index` says which photo each face is in.

    `default`: constrained average linkage at `threshold` (the embedder's calibrated value when
    None), then faces left alone join the group they resemble on average above
    `attach_threshold` (when None: `threshold` minus the calibrated gap between the two).
    `quality` (n,) with `min_quality`, when both are given (e.g. the detector's scores and
    `MIN_DETECTION_SCORE[detector]`): faces under `min_quality` (blurred, cut off, or no face at
    all) never found or bridge a group in stage 1; they may still join an established group in
    stage 2. `small` (n,): faces too small for their embedding to tell people apart alone
    (`AFTERTRIP_SMALL_FACE`; blurred faces look alike whoever they are): two of them are never
    paired in stage 1 (a group needs a face that is not small); `tiny` (n,): a unit of such
    faces joins a group in stage 2 only above `threshold`, not the lower attach bar.

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
    if method == "seed":
        return _seed_clustering((embeddings @ embeddings.T).astype(np.float32), cut)
    attach = attach_threshold_for(cut, embedder, attach_threshold)
    strong = np.ones(n, bool)
    if quality is not None and min_quality is not None:
        strong = np.asarray(quality) >= min_quality
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    return _default_clustering(
        embeddings,
        photo_index,
        cut,
        attach,
        strong,
        constraints,
        neighbours,
        index,
        None if small is None else np.asarray(small, bool),
        None if tiny is None else np.asarray(tiny, bool),
    )
