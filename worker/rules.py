"""The result's rules, each written once: which groups a photo is in, which face stands
for a group, and which faces are too small to found a person. The result file
(`worker.pipeline`), the prototype's API (`worker.compat`) and a trip's folders
(`worker.folders`) all use these."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from worker.boxes import cover_score
from worker.types import NO_FACE_GROUP, SINGLE_FACE_GROUP


def photo_groups(labels: Sequence[int], *, analysed: bool = True) -> list[int]:
    """A photo's `group_idx` from its faces' group labels (negative: a face seen only once).

    As the prototype's: the photo's people's groups in the order given, then
    `SINGLE_FACE_GROUP` (-1) once if one of its faces is seen only once; `[NO_FACE_GROUP]`
    (-2) for a photo without a face; `[]` for one that could not be analysed.
    """
    if not analysed:
        return []
    if not labels:
        return [NO_FACE_GROUP]
    groups = [int(label) for label in labels if label >= 0]
    if any(label < 0 for label in labels):
        groups.append(SINGLE_FACE_GROUP)
    return groups


def cover_faces(
    labels: Sequence[int] | NDArray[np.integer],
    scores: NDArray[np.floating],
    boxes: NDArray[np.floating],
) -> dict[int, int]:
    """The face that shows each group's person best, by group label: the highest
    `worker.boxes.cover_score` (detector score times linear size), the first on a tie."""
    values = cover_score(scores, boxes)
    best: dict[int, int] = {}
    for i, label in enumerate(labels):
        group = int(label)
        if group >= 0 and (group not in best or values[i] > values[best[group]]):
            best[group] = i
    return best


TINY_SHARE = 0.6
"""A small face under this share of `AFTERTRIP_SMALL_FACE` is tiny: alone it joins a person
only above the grouping's cut. At 40 px, faces of 24-40 working pixels keep the attach bar:
the stricter bar on them cost Nogizaka46 a labelled face (BCubed recall 0.881 -> 0.872)."""


def small_faces(
    chip_sizes: NDArray[np.floating], small_face: int
) -> tuple[NDArray[np.bool_] | None, NDArray[np.bool_] | None]:
    """`worker.cluster.cluster_faces`'s `small` and `tiny` masks from each face's size in the
    pixels its chip was cut from (None when `small_face` is 0 or there is no face). A NaN
    size (a face stored before sizes were kept) is neither small nor tiny."""
    sizes = np.asarray(chip_sizes, np.float64).reshape(-1)
    if not small_face or not sizes.size:
        return None, None
    known = np.isfinite(sizes)
    return known & (sizes < small_face), known & (sizes < TINY_SHARE * small_face)
