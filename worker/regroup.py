"""The rules of a trip's regroup around the folder plan: pure, plain values in and out.

`tasks/write.py` loads the trip through `db.trips`, asks these functions (and
`worker.folders.plan_folders`) what to do, and saves the answers through `db.trips`, all in
one transaction. Nothing here reads or writes a database:

- `notice_corrections` / `corrections_in_force` / `records_after`: what counts as a person's
  correction (a link added or removed since the worker's last regroup), which are in force,
  and which records the worker keeps after writing its links;
- `plan_directions`: a folder's stored direction beats the one computed from its faces now;
- `needs_other_votes` / `inherited_folders`: which old faces a re-detected face inherits its
  folder from (another embedder's, for a photo this embedder never analysed);
- `empty_folder_candidates`: unnamed folders no group holds any more;
- `grouping_rule`: the grouping method and threshold for the settings and the embedder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from worker.cluster import MIN_DETECTION_SCORE, default_threshold
from worker.folders import carry_folders
from worker.settings import PipelineSettings
from worker.types import (
    Correction,
    CorrectionKind,
    Folder,
    GroupingRule,
    LinkRecord,
    LinkState,
    OldFace,
    SharedFolders,
)

LinkKey = tuple[int, int]
"""(photo id, folder id): one photos_photo_tag_face link."""


def grouping_rule(settings: PipelineSettings, embedder: str) -> GroupingRule:
    """How the trip's faces are grouped: the settings' method and threshold (else the value
    calibrated for the embedder), the detector's quality floor, and the small-face size."""
    threshold = settings.similarity_threshold
    return GroupingRule(
        method=settings.grouping,
        embedder=embedder,
        threshold=threshold
        if threshold is not None
        else default_threshold(settings.grouping, embedder),
        explicit_threshold=threshold,
        min_quality=MIN_DETECTION_SCORE.get(settings.detector),
        small_face=settings.small_face,
        near_duplicates=settings.near_duplicates,
    )


def plan_directions(
    stored: Mapping[int, NDArray[np.float32]], computed: Mapping[int, NDArray[np.float32]]
) -> dict[int, NDArray[np.float32]]:
    """Each folder's direction as the last regroup left it: the stored one where there is
    one, else (a folder written before directions were stored) the mean of its faces now."""
    return {**computed, **stored}


def check_one_length(vectors: Sequence[NDArray[np.float32]]) -> None:
    """Refuse stored embeddings of one embedder that differ in length (a clear error rather
    than one from deep inside the grouping)."""
    dims = {v.shape[0] for v in vectors}
    if len(dims) > 1:
        raise ValueError(f"stored embeddings of one embedder differ in length: {sorted(dims)}")


# ---------------------------------------------------------------------------- corrections


@dataclass
class Noticed:
    """Corrections a regroup noticed: links people removed and added since the last one."""

    removed: list[LinkKey] = field(default_factory=list)
    added: list[LinkKey] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    """Ids of the records these corrections replace."""

    @property
    def rows(self) -> list[tuple[LinkKey, LinkState]]:
        """The records to insert, in the order their ids must follow."""
        return [(key, LinkState.REMOVED) for key in self.removed] + [
            (key, LinkState.ADDED) for key in self.added
        ]


def notice_corrections(
    records: Mapping[LinkKey, LinkRecord],
    links: Mapping[LinkKey, int],
    live: set[int],
    shared: SharedFolders,
) -> Noticed:
    """Compare the trip's links (key -> link id) with the worker's records of them.

    A trip without records (never regrouped since records exist, or its corrections
    forgotten) has none to notice: this regroup starts the record. Changes to the shared
    folders and to deleted photos are not corrections. A correction replaces the record of
    its link under a new id (ids order corrections): removals first, then additions in the
    order the links were made.
    """
    if not records:
        return Noticed()
    shared_ids = {shared.no_face, shared.others}
    removed: list[LinkKey] = []
    added: list[LinkKey] = []
    for key, record in records.items():
        photo_id, folder_id = key
        if photo_id not in live or folder_id in shared_ids:
            continue
        present = key in links
        if record.state in (LinkState.WORKER, LinkState.ADDED) and not present:
            removed.append(key)
        elif record.state == LinkState.REMOVED and present:
            added.append(key)
    added += [
        key for key in links if key not in records and key[0] in live and key[1] not in shared_ids
    ]
    added.sort(key=lambda key: links[key])
    replaced = sorted(records[key].id for key in removed + added if key in records)
    return Noticed(removed=sorted(removed), added=added, replaced=replaced)


def corrections_in_force(records: Mapping[LinkKey, LinkRecord], live: set[int]) -> list[Correction]:
    """The corrections of live photos, for the plan (ordered by the record's id)."""
    return [
        Correction(
            photo_id=r.photo_id,
            folder_id=r.folder_id,
            kind=CorrectionKind(r.state.value),
            order=r.id,
        )
        for r in records.values()
        if r.state != LinkState.WORKER and r.photo_id in live
    ]


@dataclass
class RecordChanges:
    """How the worker's records change once its links are written."""

    drop: list[int]
    """Record ids to delete."""
    new: list[LinkKey]
    """Links to record as the worker's."""


def records_after(
    records: Mapping[LinkKey, LinkRecord],
    desired: set[LinkKey],
    overruled: Sequence[Correction],
) -> RecordChanges:
    """Overruled corrections go (a later one won); the `worker` records become exactly the
    links written that no correction holds. An added link of a deleted photo went with the
    photo's links: its correction goes too (were the photo restored, its missing link would
    read as a removal)."""
    dropped = {(c.photo_id, c.folder_id) for c in overruled}
    drop = {records[key].id for key in dropped}
    drop |= {
        r.id for key, r in records.items() if r.state == LinkState.WORKER and key not in desired
    }
    drop |= {
        r.id for key, r in records.items() if r.state == LinkState.ADDED and key not in desired
    }
    new = sorted(key for key in desired if key not in records or key in dropped)
    return RecordChanges(drop=sorted(drop), new=new)


# ---------------------------------------------------------------------------- faces and folders


def needs_other_votes(
    photo_has_faces: Mapping[int, bool], own: Mapping[int, Sequence[OldFace]]
) -> list[int]:
    """Photos whose new faces inherit their folders from another embedder's faces: photos with
    faces now that this embedder never found a face in (after a model change)."""
    return sorted(pid for pid, has in photo_has_faces.items() if has and not own.get(pid))


def inherited_folders(
    old: Sequence[OldFace], new_boxes: Sequence[Sequence[float]], shared: SharedFolders
) -> list[int | None]:
    """The person folder each new face of a photo takes from the old face at its place (one
    to one, IoU >= 0.5): a vote the next regroup counts."""
    shared_ids = {shared.no_face, shared.others}
    tagged = [f for f in old if f.folder is not None and f.folder not in shared_ids]
    return carry_folders(
        [f.box for f in tagged], [f.folder for f in tagged if f.folder is not None], new_boxes
    )


def empty_folder_candidates(folders: Sequence[Folder], in_use: set[int]) -> list[int]:
    """Unnamed folders no group holds any more: deleted unless a photo still links to them
    (a link a person added). Named folders are never deleted."""
    return sorted(f.id for f in folders if f.id not in in_use and not f.named)
