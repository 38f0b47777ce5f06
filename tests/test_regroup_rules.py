"""The regroup's rules and the result's rules on plain values, without a database
(worker/regroup.py, worker/rules.py); test_db and test_corrections run them through the
tables."""

from __future__ import annotations

import numpy as np

from worker import regroup
from worker.cluster import default_threshold
from worker.rules import cover_faces, photo_groups
from worker.settings import PipelineSettings
from worker.types import (
    Correction,
    CorrectionKind,
    Folder,
    LinkRecord,
    LinkState,
    ModelInfo,
    ModelsUsed,
    OldFace,
    SharedFolders,
)

SHARED = SharedFolders(no_face=1, others=2)


def _records(*rows: tuple[int, int, int, LinkState]) -> dict[tuple[int, int], LinkRecord]:
    return {(p, f): LinkRecord(i, p, f, state) for i, p, f, state in rows}


def test_changes_since_the_last_regroup_are_noticed_as_corrections() -> None:
    records = _records(
        (1, 100, 10, LinkState.WORKER),  # a person removed it
        (2, 101, 10, LinkState.REMOVED),  # a person put it back
        (3, 102, 11, LinkState.WORKER),  # its photo is deleted now: not a correction
        (4, 103, 2, LinkState.WORKER),  # "others" is not a person's folder
        (5, 104, 12, LinkState.WORKER),  # unchanged
    )
    links = {(101, 10): 50, (104, 12): 20, (105, 10): 40, (106, 1): 41}
    noticed = regroup.notice_corrections(
        records, links, live={100, 101, 103, 104, 105, 106}, shared=SHARED
    )
    assert noticed.removed == [(100, 10)]
    assert noticed.added == [(105, 10), (101, 10)]  # in the order the links were made
    assert noticed.replaced == [1, 2]
    assert noticed.rows == [
        ((100, 10), LinkState.REMOVED),
        ((105, 10), LinkState.ADDED),
        ((101, 10), LinkState.ADDED),
    ]


def test_a_trip_without_records_notices_nothing() -> None:
    noticed = regroup.notice_corrections({}, {(100, 10): 1}, live={100}, shared=SHARED)
    assert noticed.rows == [] and noticed.replaced == []


def test_only_corrections_of_live_photos_are_in_force() -> None:
    records = _records(
        (7, 100, 10, LinkState.ADDED),
        (8, 101, 10, LinkState.REMOVED),
        (9, 102, 10, LinkState.WORKER),
    )
    assert regroup.corrections_in_force(records, live={100, 102}) == [
        Correction(photo_id=100, folder_id=10, kind=CorrectionKind.ADDED, order=7)
    ]


def test_after_the_write_the_worker_records_exactly_its_own_links() -> None:
    records = _records(
        (1, 100, 10, LinkState.WORKER),  # still written: kept
        (2, 101, 10, LinkState.WORKER),  # no longer written: dropped
        (3, 102, 11, LinkState.ADDED),  # overruled by a later correction: dropped, re-recorded
        (4, 103, 11, LinkState.ADDED),  # its photo's links are gone: dropped
        (5, 104, 12, LinkState.REMOVED),  # in force: kept
    )
    overruled = [Correction(102, 11, CorrectionKind.ADDED, 3)]
    changes = regroup.records_after(records, {(100, 10), (102, 11), (105, 10)}, overruled)
    assert changes.drop == [2, 3, 4]
    assert changes.new == [(102, 11), (105, 10)]


def test_stored_directions_beat_computed_ones() -> None:
    stored = {10: np.ones(2, np.float32)}
    computed = {10: np.zeros(2, np.float32), 11: np.full(2, 0.5, np.float32)}
    directions = regroup.plan_directions(stored, computed)
    assert directions[10] is stored[10] and directions[11] is computed[11]


def test_new_faces_inherit_person_folders_only_and_other_embedders_only_as_a_fallback() -> None:
    own = {1: [OldFace((0, 0, 10, 10), 10)], 2: []}
    assert regroup.needs_other_votes({1: True, 2: True, 3: False}, own) == [2]
    old = [OldFace((0, 0, 10, 10), 2), OldFace((20, 0, 30, 10), 11)]
    assert regroup.inherited_folders(old, [(0, 0, 10, 10), (21, 0, 31, 10)], SHARED) == [None, 11]


def test_only_unnamed_folders_no_group_holds_are_candidates_for_deletion() -> None:
    folders = [Folder(10, 0, False), Folder(11, 1, True), Folder(12, 2, False)]
    assert regroup.empty_folder_candidates(folders, in_use={12}) == [10]


def test_the_grouping_rule_takes_the_settings_threshold_or_the_embedder_s() -> None:
    rule = regroup.grouping_rule(PipelineSettings(similarity_threshold=0.4), "arcface")
    assert rule.threshold == rule.explicit_threshold == 0.4
    rule = regroup.grouping_rule(PipelineSettings(), "arcface")
    assert rule.explicit_threshold is None
    assert rule.threshold == default_threshold(rule.method, "arcface")


def test_a_model_of_several_files_is_one_digest() -> None:
    files = [ModelInfo(f"net{i}", "detector", f"/m/{i}", f"{i}" * 64) for i in range(3)]
    used = ModelsUsed.of([*files, ModelInfo("arc", "embedder", "/m/a", "a" * 64)])
    assert used.detector_name == "net0+net1+net2" and len(used.detector_sha256 or "") == 64
    assert (used.embedder_name, used.embedder_sha256) == ("arc", "a" * 64)


def test_folders_are_ordered_people_then_others_then_no_faces() -> None:
    assert sorted([1, 12, 2, 10], key=SHARED.order) == [10, 12, 2, 1]


def test_a_photo_s_groups_as_the_prototype_had_them() -> None:
    assert photo_groups([]) == [-2]
    assert photo_groups([3, -1, 0, -1]) == [3, 0, -1]
    assert photo_groups([-1]) == [-1]
    assert photo_groups([1], analysed=False) == []


def test_the_cover_is_the_clearest_largest_face_and_the_first_on_a_tie() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 40, 40], [0, 0, 10, 10], [0, 0, 20, 20]], np.float32)
    scores = np.array([0.9, 0.9, 0.9, 0.99], np.float32)
    assert cover_faces([0, 0, 1, 1], scores, boxes) == {0: 1, 1: 3}
    assert cover_faces([5, 5, -1, -1], np.full(4, 0.5, np.float32), boxes[[0, 2, 1, 3]]) == {5: 0}
