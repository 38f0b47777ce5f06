"""A trip's faces into its folders: grouping, matching groups to folders, corrections, links.

Pure: plain values in (`worker.types`), a `FolderPlan` out; `tasks/write.py` loads the rows
through `db.trips`, calls `plan_folders`, and saves the plan through `db.trips`.

In: every stored face of the trip's live photos (vector, photo, box, score, chip size, and
the folder it was in: its vote), the trip's person folders (id, tag_num, named?), each
folder's direction as the last regroup left it, the photos that have been analysed, and the
corrections people made in the web app (a link they added, a link they removed, each with its
order).

Out: the folder of each face (an existing folder, a new one, or "others"), the folders to
create, the links the trip should have, the covers, and what became of each correction.

Corrections are constraints of the grouping, never a patch after it:
- a removed link (photo p, folder F): no face of p may share a group with F's faces
  (cannot-link), no group holding a face of p may be F, and the link is never desired again;
- an added link (p, F): the face of p that fits F best is must-linked with F's faces and its
  group is F; the link is always desired;
- faces added later (in no person folder yet) follow a corrected face they are nearest to (at
  or above the grouping threshold): a near-copy of a removed photo stays out, a second photo
  of an added face joins;
- where corrections contradict each other, the latest (highest `order`) wins; the others are
  reported as overruled.
A merge of two folders by a person arrives as added links to the surviving folder (and removed
links from the emptied one, or nothing when it was deleted), and ends as one must-linked group.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

from worker.boxes import box_iou, cover_score
from worker.cluster import Clustering, ConstraintConflict, cluster_faces
from worker.errors import AfterTripError
from worker.neardup import follow_near_duplicates
from worker.rules import cover_faces, photo_groups, small_faces
from worker.types import (
    NO_FACE_GROUP,
    SINGLE_FACE_GROUP,
    Correction,
    CorrectionKind,
    CorrectionOutcome,
    Folder,
    FolderPlan,
    GroupingRule,
    NewFolder,
    SharedFolders,
    TripFace,
)

logger = logging.getLogger(__name__)

BOX_MATCH_IOU = 0.5
"""A re-detected face inherits the folder of the old face it overlaps at least this much."""


class CorrectionsUnresolved(AfterTripError):
    """The corrections still contradict each other after the latest-wins rule (a bug of the
    resolver, not of the person): the job fails and the previous folders stay."""


Clusterer = Callable[
    [
        NDArray[np.float32],
        NDArray[np.int64],
        NDArray[np.float32],
        "Constraints",
        GroupingRule,
        NDArray[np.float32],
    ],
    Clustering,
]
"""(vectors, photo index, quality, constraints, rule, chip sizes: NaN where unknown)."""


@dataclass
class Constraints:
    """Face indices that must share a group, and pairs that must not."""

    must_link: list[list[int]] = field(default_factory=list)
    cannot_link: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.must_link or self.cannot_link)


def default_clusterer(
    vectors: NDArray[np.float32],
    photo_index: NDArray[np.int64],
    quality: NDArray[np.float32],
    constraints: Constraints,
    rule: GroupingRule,
    chip_sizes: NDArray[np.float32],
) -> Clustering:
    """`worker.cluster.cluster_faces` with the rule's settings and the constraints, and the
    small-face masks (`worker.rules.small_faces`) of the faces' chip sizes."""
    small, tiny = small_faces(chip_sizes, rule.small_face)
    return cluster_faces(
        vectors,
        photo_index,
        method=rule.method,
        threshold=rule.explicit_threshold,
        embedder=rule.embedder,
        quality=quality,
        min_quality=rule.min_quality,
        must_link=constraints.must_link,
        cannot_link=constraints.cannot_link,
        small=small,
        tiny=tiny,
    )


# ---------------------------------------------------------------------------- helpers


def mean_direction(vectors: NDArray[np.floating]) -> NDArray[np.float32]:
    """The unit mean of some embeddings (float64 sum, so the order of faces hardly matters)."""
    mean = np.asarray(vectors, np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def folder_directions(
    vectors: Sequence[NDArray[np.float32]], folders: Sequence[int | None]
) -> dict[int, NDArray[np.float32]]:
    """Mean direction of each folder's faces (faces without a folder are left out)."""
    by_folder: dict[int, list[NDArray[np.float32]]] = defaultdict(list)
    for vector, folder in zip(vectors, folders, strict=True):
        if folder is not None:
            by_folder[folder].append(vector)
    return {
        folder: mean_direction(np.stack(vs))
        for folder, vs in by_folder.items()
        if len({v.shape[0] for v in vs}) == 1
    }


def carry_folders(
    old_boxes: Sequence[Sequence[float]],
    old_folders: Sequence[int],
    new_boxes: Sequence[Sequence[float]],
) -> list[int | None]:
    """For each new face, the folder of the old face it overlaps (IoU >= 0.5), one-to-one."""
    votes: list[int | None] = [None] * len(new_boxes)
    if not len(old_boxes) or not len(new_boxes):
        return votes
    iou = box_iou(
        np.asarray(old_boxes, np.float64).reshape(-1, 4),
        np.asarray(new_boxes, np.float64).reshape(-1, 4),
    )
    for i, j in zip(*linear_sum_assignment(iou, maximize=True), strict=True):
        if iou[i, j] >= BOX_MATCH_IOU:
            votes[j] = old_folders[i]
    return votes


# ---------------------------------------------------------------------------- the plan


def plan_folders(
    faces: Sequence[TripFace],
    *,
    folders: Sequence[Folder],
    directions: dict[int, NDArray[np.float32]],
    analysed_photos: Sequence[int],
    shared: SharedFolders,
    rule: GroupingRule,
    corrections: Sequence[Correction] = (),
    clusterer: Clusterer = default_clusterer,
) -> FolderPlan:
    """Group the trip's faces and say which folder each group is, honouring corrections.

    `faces` must be in a fixed order (the db uses photo id, face index): the same input gives
    the same plan. `analysed_photos`: live photos analysed at least once (a photo without a
    face goes to "no faces"). `directions`: each folder's direction from the last regroup.
    Give only corrections of live photos. One on a folder not given is ignored; one on a photo
    without faces here (not analysed yet, or no face found) is a link and nothing more.
    """
    by_id = {f.id: f for f in folders}
    usable = [c for c in corrections if c.folder_id in by_id]
    n = len(faces)
    vectors = (
        np.stack([f.embedding for f in faces]).astype(np.float32)
        if n
        else np.zeros((0, 0), np.float32)
    )
    photo_ids = sorted({f.photo_id for f in faces})
    dense = {pid: i for i, pid in enumerate(photo_ids)}
    photo_index = np.asarray([dense[f.photo_id] for f in faces], np.int64)

    resolver = _Resolver(faces, vectors, directions, rule.threshold)
    outcome = resolver.resolve(usable)
    if n:
        chip_sizes = np.asarray(
            [np.nan if f.chip_size is None else f.chip_size for f in faces], np.float32
        )
        constraints = resolver.constraints()
        try:
            clustering = clusterer(
                vectors,
                photo_index,
                np.asarray([f.score for f in faces], np.float32),
                constraints,
                rule,
                chip_sizes,
            )
        except ConstraintConflict as exc:
            raise CorrectionsUnresolved(
                f"the trip's corrections could not be made consistent ({exc}); nothing was "
                "written. `aftertrip-faces status --trip ID` lists them; `aftertrip-faces rerun "
                "--trip ID --forget-corrections` drops them and regroups"
            ) from exc
        if rule.near_duplicates:
            clustering = follow_near_duplicates(
                clustering,
                vectors,
                photo_index,
                np.asarray([f.box for f in faces], np.float64),
                small_faces(chip_sizes, rule.small_face)[0],
                cannot_link=constraints.cannot_link,
            )
        labels = clustering.labels.copy()
        matched, similarity = clustering.matched_face, clustering.similarity
    else:
        labels = np.zeros(0, np.int64)
        matched = np.zeros(0, np.int64)
        similarity = np.zeros(0, np.float32)
    labels = resolver.keep_forced_together(labels)

    group_folders, new_folders = _match_groups(
        faces, vectors, labels, folders, directions, resolver, rule.threshold
    )
    face_folders = [group_folders[int(lb)] if lb >= 0 else shared.others for lb in labels]
    links = _desired_links(analysed_photos, faces, labels, group_folders, shared)
    for correction in outcome.honoured:
        link = (correction.photo_id, correction.folder_id)
        if correction.kind is CorrectionKind.ADDED:
            links.add(link)
        else:
            links.discard(link)
    return FolderPlan(
        labels=labels,
        matched=np.asarray(matched, np.int64),
        similarity=np.asarray(similarity, np.float32),
        folders=face_folders,
        covers=_covers(faces, labels),
        group_folders=group_folders,
        new_folders=new_folders,
        links=links,
        corrections=outcome,
    )


class _Resolver:
    """Corrections into constraints: components of must-linked faces, each with at most one
    forced folder, and folders forbidden to faces. The latest correction goes first; one
    that contradicts what is already accepted is overruled."""

    def __init__(
        self,
        faces: Sequence[TripFace],
        vectors: NDArray[np.float32],
        directions: dict[int, NDArray[np.float32]],
        threshold: float,
    ) -> None:
        self.faces = faces
        self.vectors = vectors
        self.threshold = threshold
        self.directions = directions
        self.by_photo: dict[int, list[int]] = defaultdict(list)
        self.voters: dict[int, list[int]] = defaultdict(list)
        for i, face in enumerate(faces):
            self.by_photo[face.photo_id].append(i)
            if face.folder is not None:
                self.voters[face.folder].append(i)
        # Union-find over faces; per root: its faces, photos and forced folder.
        self.parent = list(range(len(faces)))
        self.members: dict[int, list[int]] = {}  # root -> faces (when more than itself)
        self.forced: dict[int, int] = {}  # root -> folder
        self.folder_roots: dict[int, int] = {}  # folder -> root
        self.forbidden: dict[int, set[int]] = defaultdict(set)  # face -> folders
        self.removed_photos: dict[int, set[int]] = defaultdict(set)  # folder -> photos
        # Faces a later face may follow: face -> ("added", root) or ("removed", folder).
        self.seeds: dict[int, tuple[CorrectionKind, int]] = {}

    # -- components

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _members(self, root: int) -> list[int]:
        return self.members.get(root, [root])

    def _photos(self, root: int) -> set[int]:
        return {self.faces[i].photo_id for i in self._members(root)}

    def _folder_root(self, folder: int) -> int | None:
        return self.folder_roots.get(folder)

    def _can_join(self, face: int, folder: int) -> bool:
        """Whether `face`'s component may become (part of) `folder`'s."""
        root = self.root(face)
        if self.forced.get(root, folder) != folder:
            return False
        members = self._members(root)
        if any(folder in self.forbidden.get(i, ()) for i in members):
            return False
        target = self._folder_root(folder)
        if target is None or target == root:
            return True
        return not (self._photos(root) & self._photos(target))

    def _join(self, face: int, folder: int) -> None:
        root = self.root(face)
        target = self._folder_root(folder)
        if target is not None and target != root:
            self.parent[root] = target
            self.members[target] = self._members(target) + self._members(root)
            self.members.pop(root, None)
            self.forced.pop(root, None)
            root = target
        self.forced[root] = folder
        self.folder_roots[folder] = root

    # -- corrections

    def _folder_faces(self, folder: int) -> list[int]:
        """The worker's own faces of a folder, less those of photos removed from it."""
        gone = self.removed_photos[folder]
        return [i for i in self.voters.get(folder, []) if self.faces[i].photo_id not in gone]

    def _fit(self, candidates: list[int], folder: int) -> list[int]:
        """Faces ordered by how well they fit a folder (its direction, else the best face)."""
        direction = self.directions.get(folder)
        if direction is not None and self.vectors.shape[1] == direction.shape[0]:
            sims = self.vectors[candidates] @ direction
            return [candidates[k] for k in np.argsort(-sims, kind="stable")]
        boxes = np.asarray([self.faces[i].box for i in candidates], np.float64).reshape(-1, 4)
        values = cover_score(np.asarray([self.faces[i].score for i in candidates]), boxes)
        return [candidates[k] for k in np.argsort(-values, kind="stable")]

    def resolve(self, corrections: Sequence[Correction]) -> CorrectionOutcome:
        outcome = CorrectionOutcome()
        ordered = sorted(corrections, key=lambda c: (-c.order, c.photo_id, c.folder_id))
        # Removals first define what a folder's own faces are (a removed photo's face is not
        # one of them), whatever their order; their conflicts are checked in order below.
        for c in ordered:
            if c.kind is CorrectionKind.REMOVED:
                self.removed_photos[c.folder_id].add(c.photo_id)
        for c in ordered:
            ok = self._add(c) if c.kind is CorrectionKind.ADDED else self._remove(c)
            (outcome.honoured if ok else outcome.overruled).append(c)
            if not ok:
                logger.info(
                    "correction overruled by a later one",
                    extra={"photo_id": c.photo_id, "tag_id": c.folder_id, "kind": c.kind.value},
                )
        outcome.followers = self._follow()
        return outcome

    def _add(self, c: Correction) -> bool:
        faces = self.by_photo.get(c.photo_id, [])
        if not faces:
            return True  # a photo without a face: the link alone is the correction
        folder = c.folder_id
        if self._folder_root(folder) is None:
            # The folder's own faces become one component first (a person curated it).
            for i in self._folder_faces(folder):
                if self._can_join(i, folder):
                    self._join(i, folder)
        for i in self._fit(faces, folder):
            if self._can_join(i, folder):
                self._join(i, folder)
                self.seeds[i] = (CorrectionKind.ADDED, folder)
                return True
        return False

    def _remove(self, c: Correction) -> bool:
        faces = self.by_photo.get(c.photo_id, [])
        if any(self.forced.get(self.root(i)) == c.folder_id for i in faces):
            return False  # a later correction put this photo's face into the folder
        for i in faces:
            self.forbidden[i].add(c.folder_id)
        # The face that was in the folder (else the one that fits it best) is followed.
        was_in = [i for i in faces if self.faces[i].folder == c.folder_id]
        for i in was_in or self._fit(faces, c.folder_id)[:1]:
            self.seeds.setdefault(i, (CorrectionKind.REMOVED, c.folder_id))
        return True

    def _follow(self) -> int:
        """Free faces whose nearest face (at or above the threshold) is a corrected face, or
        one that followed, take its constraint; returns how many did."""
        n = len(self.faces)
        if not self.seeds or n < 2:
            return 0
        constrained = {i for i in range(n) if self.root(i) in self.forced or self.forbidden.get(i)}
        frontier = sorted(self.seeds)
        followers = 0
        while frontier:
            sims = self.vectors @ self.vectors[frontier].T  # (n, |frontier|)
            close = np.flatnonzero((sims >= self.threshold).any(axis=1))
            candidates = [int(i) for i in close if int(i) not in constrained]
            next_frontier: list[int] = []
            for i, nearest in zip(candidates, self._nearest(candidates), strict=True):
                if nearest is None or nearest not in self.seeds:
                    continue
                kind, folder = self.seeds[nearest]
                # Only faces the worker has not placed with someone else follow: new ones (no
                # folder), and those already beside the corrected face. A face the person left
                # in the folder, or one in another person's folder, stays where it is.
                own = self.faces[i].folder
                if kind is CorrectionKind.ADDED:
                    allowed = own is None or own == folder
                else:
                    allowed = own is None or (own != folder and own == self.faces[nearest].folder)
                if not allowed:
                    continue
                if kind is CorrectionKind.ADDED:
                    if not self._can_join(i, folder):
                        continue
                    self._join(i, folder)
                else:
                    if self.forced.get(self.root(i)) == folder:
                        continue
                    self.forbidden[i].add(folder)
                self.seeds[i] = (kind, folder)
                constrained.add(i)
                next_frontier.append(i)
                followers += 1
            frontier = next_frontier
        return followers

    def _nearest(self, faces: list[int], block: int = 256) -> list[int | None]:
        """Each face's most similar face in another photo, if at or above the threshold
        (computed a block of faces at a time: memory grows with the trip, not its square)."""
        photo_of = np.asarray([f.photo_id for f in self.faces])
        out: list[int | None] = []
        for start in range(0, len(faces), block):
            rows = faces[start : start + block]
            sims = self.vectors[rows] @ self.vectors.T
            sims[photo_of[rows][:, None] == photo_of[None, :]] = -np.inf
            best = np.argmax(sims, axis=1)
            for k, j in enumerate(best):
                out.append(int(j) if sims[k, j] >= self.threshold else None)
        return out

    def constraints(self) -> Constraints:
        out = Constraints()
        folder_rep: dict[int, list[int]] = {}
        for folder, root in sorted(self.folder_roots.items()):
            members = sorted(self._members(root))
            folder_rep[folder] = members
            if len(members) > 1:
                out.must_link.append(members)
        # Forced components of different folders never share a group: one pair each suffices,
        # as a must-linked set moves as a whole.
        reps = sorted((members[0], folder) for folder, members in folder_rep.items())
        for a in range(len(reps)):
            for b in range(a + 1, len(reps)):
                out.cannot_link.append((reps[a][0], reps[b][0]))
        # A face forbidden a folder never joins that folder's faces (unless a later correction
        # must-linked them: then the pair is left out, as it would contradict).
        for i, banned in sorted(self.forbidden.items()):
            for folder in sorted(banned):
                others = (
                    folder_rep[folder][:1] if folder in folder_rep else self._folder_faces(folder)
                )
                out.cannot_link.extend((i, j) for j in others if self.root(j) != self.root(i))
        return out

    def keep_forced_together(self, labels: NDArray[np.int64]) -> NDArray[np.int64]:
        """A forced component left alone by the grouping (one face) still is its folder's
        group: it gets a label of its own."""
        labels = labels.copy()
        next_label = int(labels.max()) + 1 if labels.size else 0
        for _folder, root in sorted(self.folder_roots.items()):
            members = self._members(root)
            if all(labels[i] < 0 for i in members):
                labels[members] = next_label
                next_label += 1
        return labels

    def forced_folder(self, face: int) -> int | None:
        return self.forced.get(self.root(face))


def _match_groups(
    faces: Sequence[TripFace],
    vectors: NDArray[np.float32],
    labels: NDArray[np.int64],
    folders: Sequence[Folder],
    directions: dict[int, NDArray[np.float32]],
    resolver: _Resolver,
    threshold: float,
) -> tuple[dict[int, int], list[NewFolder]]:
    """Folder of each group: forced by corrections, then by votes, then by direction, else new."""
    groups = sorted({int(x) for x in labels if x >= 0})
    if not groups:
        return {}, []
    by_id = {f.id: f for f in folders}
    assigned: dict[int, int] = {}
    banned: dict[int, set[int]] = defaultdict(set)
    for i, label in enumerate(labels):
        if label < 0:
            continue
        banned[int(label)] |= resolver.forbidden.get(i, set())
        folder = resolver.forced_folder(i)
        if folder is not None and int(label) not in assigned:
            assigned[int(label)] = folder

    # 1) Votes: faces that were already in a folder (kept, or re-detected in place).
    free_groups = [g for g in groups if g not in assigned]
    tag_ids = sorted(t for t in by_id if t not in set(assigned.values()))
    if free_groups and tag_ids:
        col = {t: j for j, t in enumerate(tag_ids)}
        row = {g: i for i, g in enumerate(free_groups)}
        votes = np.zeros((len(free_groups), len(tag_ids)), np.int64)
        for face, label in zip(faces, labels, strict=True):
            if label >= 0 and int(label) in row and face.folder in col:
                votes[row[int(label)], col[face.folder]] += 1
        for g in free_groups:
            for t in banned[g]:
                if t in col:
                    votes[row[g], col[t]] = 0
        # Equal votes (two folders merged into one group): the named folder wins.
        named = np.asarray([by_id[t].named for t in tag_ids])
        score = 2 * votes + ((votes > 0) & named[None, :])
        for i, j in zip(*linear_sum_assignment(score, maximize=True), strict=True):
            if votes[i, j] > 0:
                assigned[free_groups[i]] = tag_ids[j]

    # 2) Similarity of mean embeddings, for groups no face voted for.
    free_groups = [g for g in groups if g not in assigned]
    taken = set(assigned.values())
    free_tags = [t for t in sorted(by_id) if t not in taken and t in directions]
    if free_groups and free_tags:
        means = np.stack([mean_direction(vectors[labels == g]) for g in free_groups])
        olds = np.stack([directions[t] for t in free_tags])
        if means.shape[1] == olds.shape[1]:
            sim = means @ olds.T
            for i, g in enumerate(free_groups):
                for j, t in enumerate(free_tags):
                    if t in banned[g]:
                        sim[i, j] = -1.0
            for i, j in zip(*linear_sum_assignment(sim, maximize=True), strict=True):
                if sim[i, j] >= threshold:
                    assigned[free_groups[i]] = free_tags[j]

    # 3) New people: new folders, numbered after the trip's existing ones.
    used_nums = {f.tag_num for f in folders}
    new_folders: list[NewFolder] = []
    for label in groups:
        if label in assigned:
            continue
        tag_num = next(k for k in range(len(used_nums) + 1) if k not in used_nums)
        used_nums.add(tag_num)
        new = NewFolder(key=-(len(new_folders) + 1), tag_num=tag_num)
        new_folders.append(new)
        assigned[label] = new.key
    return assigned, new_folders


def _covers(faces: Sequence[TripFace], labels: NDArray[np.int64]) -> list[bool]:
    """The face that shows each person best, by the result file's rule."""
    if not faces:
        return []
    winners = set(
        cover_faces(
            labels,
            np.array([f.score for f in faces], np.float64),
            np.array([f.box for f in faces], np.float64).reshape(-1, 4),
        ).values()
    )
    return [i in winners for i in range(len(faces))]


def _desired_links(
    analysed_photos: Sequence[int],
    faces: Sequence[TripFace],
    labels: NDArray[np.int64],
    group_folders: dict[int, int],
    shared: SharedFolders,
) -> set[tuple[int, int]]:
    """(photo_id, folder) pairs the trip should have: the photo's `group_idx`
    (`worker.rules.photo_groups`) with each group as its folder, -1 as "others" and -2 as
    "no faces"."""
    labels_by_photo: dict[int, list[int]] = defaultdict(list)
    for face, label in zip(faces, labels, strict=True):
        labels_by_photo[face.photo_id].append(int(label))
    folder_of = {**group_folders, NO_FACE_GROUP: shared.no_face, SINGLE_FACE_GROUP: shared.others}
    return {
        (photo_id, folder_of[group])
        for photo_id in analysed_photos
        for group in photo_groups(labels_by_photo.get(photo_id, []))
    }
