"""A trip's writes, each in one transaction: load (`db/`) -> decide (`worker/`) -> save (`db/`).

- `store_photo_outcomes`: one batch of analysed photos (their faces and statuses);
- `regroup_trip`: group every stored face of the trip and rewrite its folders and links;
- `write_trip_result`: both at once (all or nothing).

Each runs its own transaction, from start to commit: pass a Session with none open (commit or
roll back after earlier reads; sessions from `db.session.make_sessionmaker` keep the loaded
attributes so that reading them does not open one again). On any exception nothing of it is
written. Celery-free: the task, `rerun --inline` and tests call these the same way.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from db.common import trip_write
from db.photos import load_batch, other_embedders_faces, save_batch
from db.schemas import PhotoOutcome, TripWriteSummary
from db.trips import TripRows
from db.types import utcnow
from db.webapp import NO_FACE_TAG_ID, OTHERS_TAG_ID, SHARED_FOLDER_IDS
from worker.folders import folder_directions, plan_folders
from worker.regroup import (
    check_one_length,
    corrections_in_force,
    empty_folder_candidates,
    grouping_rule,
    inherited_folders,
    needs_other_votes,
    notice_corrections,
    plan_directions,
    records_after,
)
from worker.settings import PipelineSettings
from worker.types import ModelInfo

logger = logging.getLogger(__name__)


def store_photo_outcomes(
    *,
    session: Session,
    trip_id: int,
    outcomes: Sequence[PhotoOutcome],
    embedder: ModelInfo,
    job_id: int | None,
) -> int:
    """Store one batch of analysed photos in a short transaction of its own; returns how
    many of them failed.

    An ok outcome replaces that photo's faces for this embedder in place by face_index (a
    batch stored twice stores nothing twice); a re-detected face takes the folder of the old
    face its box overlaps (IoU >= 0.5), so nothing is lost before the next regroup. Any
    other status records the error and keeps the photo's previous faces. Folders and links
    are not touched: `regroup_trip` does that.
    """
    with trip_write(session, trip_id, "store_photo_outcomes", lock=False):
        return _store(session, trip_id, outcomes, embedder, job_id, utcnow())


def regroup_trip(
    *,
    session: Session,
    trip_id: int,
    embedder: ModelInfo,
    settings: PipelineSettings,
    job_id: int | None,
) -> TripWriteSummary:
    """Group every stored face of the trip's live photos and rewrite its folders.

    - All stored faces of the trip's photos that are not deleted are grouped
      (`worker.folders.plan_folders`), in (photo_id, face_index) order, honouring the
      corrections people made in the web app.
    - Groups are matched one-to-one to the trip's existing folders, first by the folders
      their faces were in, then by direction (>= the grouping threshold): a matched folder
      keeps its id and custom_name. Other groups get new folders.
    - Links: a face in a group -> its folder; a photo with no face -> folder 1; a photo
      with a face seen once -> folder 2. Deleted photos lose their links. Unchanged links
      keep their rows; unnamed folders left empty are deleted.

    The same stored faces give identical rows, so running it twice changes nothing.
    `errors` of the summary is 0 (stores count failed photos).
    """
    with trip_write(session, trip_id, "regroup_trip"):
        rows = TripRows(session, trip_id, embedder.sha256, job_id)
        return _regroup(rows, _directions(rows), embedder, settings)


def write_trip_result(
    *,
    session: Session,
    trip_id: int,
    analyzed: Sequence[PhotoOutcome],
    embedder: ModelInfo,
    settings: PipelineSettings,
    job_id: int | None = None,
) -> TripWriteSummary:
    """`store_photo_outcomes` and `regroup_trip` in one transaction (all or nothing).

    Same inputs give identical rows, so a redelivered job changes nothing the second time.
    """
    with trip_write(session, trip_id, "write_trip_result"):
        rows = TripRows(session, trip_id, embedder.sha256, job_id)
        # The folders' directions as the last regroup left them, before the store below
        # rewrites face rows.
        directions = _directions(rows)
        errors = _store(session, trip_id, analyzed, embedder, job_id, rows.now)
        session.flush()
        summary = _regroup(rows, directions, embedder, settings)
        summary.errors = errors
        return summary


def _store(
    session: Session,
    trip_id: int,
    outcomes: Sequence[PhotoOutcome],
    embedder: ModelInfo,
    job_id: int | None,
    now: datetime,
) -> int:
    batch = load_batch(session, trip_id=trip_id, outcomes=outcomes, embedder_sha256=embedder.sha256)
    own = {pid: batch.old_faces(pid) for pid in batch.faces}
    others = other_embedders_faces(
        session,
        photo_ids=needs_other_votes({o.photo_id: bool(o.faces) for o in outcomes}, own),
        embedder_sha256=embedder.sha256,
    )
    folders = {
        o.photo_id: inherited_folders(
            own.get(o.photo_id) or others.get(o.photo_id, []),
            [f.box for f in o.faces],
            SHARED_FOLDER_IDS,
        )
        for o in outcomes
        if o.photo_id in batch.deleted
    }
    return save_batch(
        session, batch, outcomes, folders=folders, embedder=embedder, job_id=job_id, now=now
    )


def _directions(rows: TripRows) -> dict[int, NDArray[np.float32]]:
    vectors, folders = rows.face_folders()
    return plan_directions(rows.stored_directions(), folder_directions(vectors, folders))


def _regroup(
    rows: TripRows,
    directions: dict[int, NDArray[np.float32]],
    embedder: ModelInfo,
    settings: PipelineSettings,
) -> TripWriteSummary:
    faces, folders, live = rows.load()
    noticed = notice_corrections(rows.records(), rows.links(), live, SHARED_FOLDER_IDS)
    if noticed.rows:
        rows.record_corrections(noticed.replaced, noticed.rows)
        logger.info(
            "corrections noticed",
            extra={
                "trip_id": rows.trip_id,
                "added": len(noticed.added),
                "removed": len(noticed.removed),
            },
        )
    records = rows.records()
    analysed = rows.analysed_photos()
    check_one_length([f.embedding for f in faces])
    plan = plan_folders(
        faces,
        folders=folders,
        directions=directions,
        analysed_photos=analysed,
        shared=SHARED_FOLDER_IDS,
        rule=grouping_rule(settings, embedder.name),
        corrections=corrections_in_force(records, live),
    )
    ids = rows.create_folders(plan.new_folders)
    rows.update_faces(plan, ids)
    desired = {(photo, ids.get(tag, tag)) for photo, tag in plan.links}
    added, removed = rows.replace_links(desired)
    changes = records_after(rows.records(), desired, plan.corrections.overruled)
    rows.record_links(changes.drop, changes.new)
    in_use = {ids.get(tag, tag) for tag in plan.group_folders.values()}
    doomed = rows.delete_folders(empty_folder_candidates(folders, in_use))
    vectors, face_folders = rows.face_folders()
    rows.save_directions(
        folder_directions(vectors, face_folders), Counter(f for f in face_folders if f is not None)
    )
    summary = TripWriteSummary(
        photos=len(analysed),
        faces=len(faces),
        people=plan.people,
        others=sum(1 for _, tag in desired if tag == OTHERS_TAG_ID),
        no_face=sum(1 for _, tag in desired if tag == NO_FACE_TAG_ID),
        errors=0,
        tags_created=len(plan.new_folders),
        tags_deleted=len(doomed),
        links_added=added,
        links_removed=removed,
        corrections=len(plan.corrections.honoured) + len(plan.corrections.overruled),
        corrections_noticed=len(noticed.rows),
        corrections_honoured=len(plan.corrections.honoured),
        corrections_overruled=len(plan.corrections.overruled),
        corrections_followers=plan.corrections.followers,
    )
    logger.info(
        "trip regrouped",
        extra={"trip_id": rows.trip_id, "job_id": rows.job_id, **summary.__dict__},
    )
    return summary
