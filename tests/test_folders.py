"""worker.folders without a database: grouping, folder matching, links, covers, corrections."""

from __future__ import annotations

import numpy as np
import pytest

from worker.cluster import Clustering
from worker.folders import (
    Constraints,
    Correction,
    CorrectionKind,
    Folder,
    FolderPlan,
    GroupingRule,
    SharedFolders,
    TripFace,
    carry_folders,
    folder_directions,
    mean_direction,
    plan_folders,
)

DIM = 512
SHARED = SharedFolders(no_face=1, others=2)
RULE = GroupingRule(method="default", embedder="w600k_mbf", threshold=0.34)
ADDED, REMOVED = CorrectionKind.ADDED, CorrectionKind.REMOVED


class Cast:
    """Random identities in 512-d (nearly orthogonal) and noisy faces of them."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.bases: dict[str, np.ndarray] = {}

    def vector(self, who: str, noise: float = 0.5) -> np.ndarray:
        if who not in self.bases:
            base = self.rng.standard_normal(DIM)
            self.bases[who] = base / np.linalg.norm(base)
        v = self.bases[who] + noise * _unit(self.rng.standard_normal(DIM))
        return _unit(v)

    def faces(
        self, photos: list[list[str]], folders: dict[str, int] | None = None, first_id: int = 100
    ) -> list[TripFace]:
        """Faces of photos `first_id`, `first_id + 1`, ...; `folders`: who was in which."""
        out = []
        for k, names in enumerate(photos):
            for slot, who in enumerate(names):
                x = 100.0 * slot
                out.append(
                    TripFace(
                        photo_id=first_id + k,
                        embedding=self.vector(who),
                        score=0.9,
                        box=(x, 0.0, x + 80.0, 100.0),
                        folder=(folders or {}).get(who),
                    )
                )
        return out


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _photos(faces: list[TripFace]) -> list[int]:
    return sorted({f.photo_id for f in faces})


def _plan(faces: list[TripFace], folders: list[Folder] = (), **kwargs) -> FolderPlan:  # type: ignore[assignment]
    kwargs.setdefault("analysed_photos", _photos(faces))
    kwargs.setdefault("directions", {})
    return plan_folders(faces, folders=list(folders), shared=SHARED, rule=RULE, **kwargs)


def _folders_of(plan: FolderPlan, photo: int) -> set[int]:
    return {tag for p, tag in plan.links if p == photo}


CAST = [["A", "B"], ["A", "C"], ["B", "C"], ["A"], [], ["D"], ["B", "E"]]


def test_new_trip_makes_a_folder_per_person_and_links_like_the_prototype() -> None:
    faces = Cast().faces(CAST)
    plan = _plan(faces, analysed_photos=list(range(100, 107)))
    assert len(plan.new_folders) == 3 and plan.people == 3
    assert sorted(f.tag_num for f in plan.new_folders) == [0, 1, 2]
    a = _folders_of(plan, 103).pop()
    assert _folders_of(plan, 100) >= {a} and _folders_of(plan, 101) >= {a}
    assert _folders_of(plan, 104) == {SHARED.no_face}
    assert _folders_of(plan, 105) == {SHARED.others}
    assert SHARED.others in _folders_of(plan, 106) and len(_folders_of(plan, 106)) == 2
    assert len(plan.links) == 11
    # One cover per person, none for faces alone.
    for label in set(plan.labels[plan.labels >= 0].tolist()):
        assert sum(c for c, lb in zip(plan.covers, plan.labels, strict=True) if lb == label) == 1
    assert not any(c for c, lb in zip(plan.covers, plan.labels, strict=True) if lb < 0)


def test_folders_keep_their_ids_by_votes_then_by_direction() -> None:
    cast = Cast()
    alice, bob, carol = Folder(10, 0, True), Folder(11, 1, False), Folder(12, 2, False)
    # Everyone voted: the same folders.
    faces = cast.faces(CAST, folders={"A": 10, "B": 11, "C": 12})
    plan = _plan(faces, [alice, bob, carol])
    assert plan.new_folders == [] and set(plan.group_folders.values()) == {10, 11, 12}
    assert _folders_of(plan, 103) == {10}
    # No votes at all (every face re-detected elsewhere): the remembered directions match.
    directions = {10: mean_direction(np.stack([cast.bases["A"]]))}
    faces = cast.faces(CAST)
    plan = _plan(faces, [alice], directions=directions)
    assert _folders_of(plan, 103) == {10}
    assert len(plan.new_folders) == 2 and {f.tag_num for f in plan.new_folders} == {1, 2}


def test_two_folders_in_one_group_the_named_one_wins() -> None:
    cast = Cast()
    faces = cast.faces([["A"], ["A"]], folders={"A": 20}) + cast.faces(
        [["A"], ["A"]], folders={"A": 21}, first_id=200
    )
    plan = _plan(faces, [Folder(20, 0, False), Folder(21, 1, True)])
    assert set(plan.group_folders.values()) == {21}


def test_no_faces_and_empty_input() -> None:
    plan = _plan([], analysed_photos=[5, 6])
    assert plan.links == {(5, 1), (6, 1)} and plan.people == 0 and plan.new_folders == []


def test_carry_folders_follows_overlapping_boxes_one_to_one() -> None:
    old = [[0, 0, 100, 100], [200, 0, 300, 100]]
    new = [[205, 5, 305, 105], [0, 0, 90, 100], [500, 0, 600, 100]]
    assert carry_folders(old, [7, 8], new) == [8, 7, None]
    assert carry_folders([], [], new) == [None, None, None]


def test_folder_directions_are_unit_means() -> None:
    v = [np.array([1, 0], np.float32), np.array([0, 1], np.float32), np.array([1, 0], np.float32)]
    directions = folder_directions(v, [3, 3, None])
    assert set(directions) == {3}
    np.testing.assert_allclose(directions[3], [2**-0.5, 2**-0.5], rtol=1e-6)


# ---------------------------------------------------------------------------- corrections


class Recorder:
    """A clusterer that records the constraints and groups by who each face is (the truth),
    then applies the constraints as a grouping must: must-linked sets whole, cannot-linked
    pairs apart (the later member moves out to a group of its own)."""

    def __init__(self, who: list[str]) -> None:
        self.who = who
        self.constraints: Constraints | None = None

    def __call__(self, vectors, photo_index, quality, constraints, rule, chip_sizes) -> Clustering:  # type: ignore[no-untyped-def]
        self.constraints = constraints
        names = sorted(set(self.who))
        labels = np.array([names.index(w) for w in self.who], np.int64)
        for group in constraints.must_link:
            labels[group] = labels[group[0]]
        next_label = len(names) + len(constraints.must_link)
        for a, b in constraints.cannot_link:
            if labels[a] == labels[b]:
                labels[b] = next_label
                next_label += 1
        n = len(labels)
        return Clustering(labels, np.full(n, -1, np.int64), np.full(n, np.nan, np.float32))


def _truth(photos: list[list[str]]) -> list[str]:
    return [who for names in photos for who in names]


def test_a_removed_link_becomes_a_cannot_link_and_is_never_written() -> None:
    cast = Cast()
    photos = [["A"], ["A"], ["A"], ["B"], ["B"]]
    faces = cast.faces(photos, folders={"A": 10, "B": 11})
    folders = [Folder(10, 0, False), Folder(11, 1, False)]
    recorder = Recorder(_truth(photos))
    removed = Correction(photo_id=102, folder_id=10, kind=REMOVED, order=1)
    plan = _plan(faces, folders, corrections=[removed], clusterer=recorder)
    assert recorder.constraints is not None
    assert sorted(recorder.constraints.cannot_link) == [(2, 0), (2, 1)]
    assert (102, 10) not in plan.links and _folders_of(plan, 100) == {10}
    assert plan.corrections.honoured == [removed]


def test_an_added_link_must_links_the_best_fitting_face_with_the_folder() -> None:
    cast = Cast()
    photos = [["A"], ["A"], ["B", "C"], ["C"]]
    faces = cast.faces(photos, folders={"A": 10})
    recorder = Recorder(_truth(photos))
    directions = folder_directions([f.embedding for f in faces[:2]], [10, 10])
    added = Correction(photo_id=102, folder_id=10, kind=ADDED, order=1)
    plan = _plan(
        faces,
        [Folder(10, 0, True)],
        corrections=[added],
        clusterer=recorder,
        directions=directions,
    )
    assert recorder.constraints is not None
    (group,) = recorder.constraints.must_link
    # Faces of A, and one face of the added photo (neither fits A: the first, by the tie rule).
    assert group[:2] == [0, 1] and len(group) == 3 and group[2] in (2, 3)
    assert (102, 10) in plan.links
    assert plan.corrections.honoured == [added]


def test_the_latest_correction_wins() -> None:
    cast = Cast()
    photos = [["A"], ["A"], ["B"], ["B"], ["X"]]
    faces = cast.faces(photos, folders={"A": 10, "B": 11})
    folders = [Folder(10, 0, False), Folder(11, 1, False)]
    older = Correction(photo_id=104, folder_id=10, kind=ADDED, order=1)
    newer = Correction(photo_id=104, folder_id=11, kind=ADDED, order=2)
    plan = _plan(faces, folders, corrections=[older, newer], clusterer=Recorder(_truth(photos)))
    assert plan.corrections.honoured == [newer] and plan.corrections.overruled == [older]
    assert _folders_of(plan, 104) == {11}


def test_corrections_on_unknown_photos_or_folders_block_nothing() -> None:
    cast = Cast()
    photos = [["A"], ["A"]]
    faces = cast.faces(photos, folders={"A": 10})
    recorder = Recorder(_truth(photos))
    no_face = Correction(photo_id=999, folder_id=10, kind=ADDED, order=1)  # not analysed yet
    unknown = Correction(photo_id=100, folder_id=77, kind=REMOVED, order=2)  # not the trip's
    plan = _plan(faces, [Folder(10, 0, False)], corrections=[no_face, unknown], clusterer=recorder)
    assert recorder.constraints is not None and not recorder.constraints
    assert plan.corrections.honoured == [no_face] and plan.corrections.overruled == []
    assert _folders_of(plan, 100) == {10} and (999, 10) in plan.links


@pytest.mark.parametrize("kind", [ADDED, REMOVED])
def test_a_near_copy_follows_the_corrected_face(kind: CorrectionKind) -> None:
    cast = Cast(seed=3)
    photos = [["A"], ["A"], ["A"], ["Z"]]
    faces = cast.faces(photos, folders={"A": 10})
    corrected = 3 if kind is ADDED else 2
    copy = TripFace(
        photo_id=200,
        embedding=_unit(faces[corrected].embedding + 0.05 * cast.vector("noise")),
        score=0.9,
        box=(0.0, 0.0, 80.0, 100.0),
    )
    faces.append(copy)
    recorder = Recorder([*_truth(photos), "copy"])
    correction = Correction(photo_id=100 + corrected, folder_id=10, kind=kind, order=1)
    plan = _plan(faces, [Folder(10, 0, False)], corrections=[correction], clusterer=recorder)
    assert plan.corrections.followers == 1
    assert recorder.constraints is not None
    if kind is ADDED:
        assert any(4 in group and 3 in group for group in recorder.constraints.must_link)
        assert 10 in _folders_of(plan, 200)
    else:
        assert (4, 0) in recorder.constraints.cannot_link
        assert 10 not in _folders_of(plan, 200)


def test_corrections_through_the_real_grouping() -> None:
    """`cluster_faces` with the plan's constraints: a removed face leaves its look-alikes, a
    face added to a folder of someone else joins it, and so does its near copy."""
    cast = Cast(seed=5)
    photos = [["A"], ["A"], ["A"], ["A"], ["B"], ["B"], ["C"]]
    faces = cast.faces(photos, folders={"A": 10, "B": 11})
    c_copy = TripFace(
        photo_id=300,
        embedding=_unit(faces[6].embedding + 0.1 * cast.vector("noise")),
        score=0.9,
        box=(0.0, 0.0, 80.0, 100.0),
    )
    folders = [Folder(10, 0, True), Folder(11, 1, False)]
    directions = folder_directions([f.embedding for f in faces[:6]], [10] * 4 + [11] * 2)
    plain = _plan([*faces, c_copy], folders, directions=directions)
    assert _folders_of(plain, 103) == {10} and 10 not in _folders_of(plain, 106)
    corrections = [
        Correction(photo_id=103, folder_id=10, kind=REMOVED, order=1),
        Correction(photo_id=106, folder_id=11, kind=ADDED, order=2),
    ]
    plan = _plan([*faces, c_copy], folders, directions=directions, corrections=corrections)
    assert plan.corrections.honoured == sorted(corrections, key=lambda c: -c.order)
    assert 10 not in _folders_of(plan, 103)
    assert {p for p, tag in plan.links if tag == 10} == {100, 101, 102}
    assert {p for p, tag in plan.links if tag == 11} == {104, 105, 106, 300}
    assert plan.corrections.followers == 1


def test_constraints_the_grouping_refuses_fail_with_what_to_do() -> None:
    from worker.cluster import ConstraintConflict
    from worker.folders import CorrectionsUnresolved

    def refusing(*args: object) -> Clustering:
        raise ConstraintConflict("faces 0 and 1 are both must- and cannot-linked")

    faces = Cast().faces([["A"], ["A"]], folders={"A": 10})
    removed = Correction(photo_id=100, folder_id=10, kind=REMOVED, order=1)
    with pytest.raises(CorrectionsUnresolved, match="--forget-corrections"):
        _plan(faces, [Folder(10, 0, False)], corrections=[removed], clusterer=refusing)


def test_faces_already_placed_with_someone_else_do_not_follow() -> None:
    """A face the worker put in another person's folder stays there even when its nearest
    face is one a person added elsewhere (only new faces follow)."""
    cast = Cast(seed=7)
    photos = [["A"], ["A"], ["C"], ["C"]]
    faces = cast.faces(photos, folders={"A": 10, "C": 12})
    faces[3] = TripFace(
        photo_id=103,
        embedding=_unit(faces[2].embedding + 0.05 * cast.vector("noise")),
        score=0.9,
        box=(0.0, 0.0, 80.0, 100.0),
        folder=12,
    )
    recorder = Recorder(_truth(photos))
    added = Correction(photo_id=102, folder_id=10, kind=ADDED, order=1)
    plan = _plan(
        faces, [Folder(10, 0, False), Folder(12, 1, False)], corrections=[added], clusterer=recorder
    )
    assert plan.corrections.followers == 0
    assert _folders_of(plan, 102) == {10} and 10 not in _folders_of(plan, 103)
