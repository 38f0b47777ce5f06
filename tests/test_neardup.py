"""worker.neardup on synthetic face sets: layouts matched up to scale and shift, and small
faces following the large face at their place in a near-duplicate shot (also through the
trip's folder plan)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.cluster import Clustering
from worker.folders import plan_folders
from worker.neardup import follow_near_duplicates, layout_match
from worker.pipeline import AnalyzedPhoto, StageTimer, assemble_album
from worker.settings import PipelineSettings
from worker.types import Detections, GroupingRule, PhotoStatus, SharedFolders, TripFace

DIM = 64
SHARED = SharedFolders(no_face=1, others=2)


def _boxes(centres: np.ndarray, width: float) -> np.ndarray:
    half = width / 2
    return np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)


# A group of five standing in two rows, in a 4000 x 3000 photo, faces 90 px wide.
GROUP = np.array([[1000, 1200], [1300, 1180], [1600, 1210], [1150, 1500], [1450, 1520]], float)


def _far(centres: np.ndarray, scale: float = 0.3, shift: tuple[float, float] = (2100, 1900)):
    """The same group from further back: scaled and moved, with a pixel of detection noise."""
    noise = np.random.default_rng(1).normal(0, 1.0, centres.shape)
    return centres * scale + np.asarray(shift) + noise


def test_a_scaled_and_shifted_layout_matches_one_to_one() -> None:
    far = _far(GROUP)
    match = layout_match(_boxes(far, 27), _boxes(GROUP, 90))
    assert match is not None
    assert match.pairs == [(i, i) for i in range(5)]
    assert match.scale == pytest.approx(1 / 0.3, rel=0.02)
    assert match.residual < 0.1


def test_a_stranger_stays_unmatched_and_the_order_does_not_matter() -> None:
    far = _far(GROUP)[[3, 0, 4, 1, 2]]
    stranger = np.array([[3500.0, 2400.0]])  # someone walking by, far from the group
    match = layout_match(_boxes(np.concatenate([far, stranger]), 27), _boxes(GROUP, 90))
    assert match is not None
    assert sorted(match.pairs) == [(0, 3), (1, 0), (2, 4), (3, 1), (4, 2)]
    assert all(i != 5 for i, _ in match.pairs)


def test_a_different_layout_or_too_few_faces_do_not_match() -> None:
    other = np.random.default_rng(2).uniform(500, 3500, (5, 2))
    assert layout_match(_boxes(other, 27), _boxes(GROUP, 90)) is None
    # the same people rearranged: on a slope, one step down per step along
    row = np.array([[1000 + 300.0 * k, 900 + 300.0 * k] for k in range(5)])
    assert layout_match(_boxes(_far(row), 27), _boxes(GROUP, 90)) is None
    # two faces always fit a scale and a shift: not evidence
    two = GROUP[:2]
    assert layout_match(_boxes(_far(two), 27), _boxes(two, 90)) is None


def test_face_sizes_must_agree_with_the_fitted_scale() -> None:
    far = _far(GROUP)
    sizes = np.array([27, 27, 27, 27, 60.0])  # the last face is far too big for its place
    boxes = np.concatenate([far - sizes[:, None] / 2, far + sizes[:, None] / 2], axis=1)
    match = layout_match(boxes, _boxes(GROUP, 90))
    assert match is not None
    assert [i for i, _ in match.pairs] == [0, 1, 2, 3]


# ------------------------------------------------------------------- following a near duplicate


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _album(weak: float):
    """Photo 0: the group large, each face grouped (persons 0-4, each also in photo 1);
    photo 2: the group from further back, small, person 3's face weak (cosine about `weak`
    to its person), in "others", and a stranger beside the group."""
    rng = np.random.default_rng(3)
    people = _unit(rng.standard_normal((5, DIM)))
    stranger = _unit(rng.standard_normal(DIM))

    def face(base: np.ndarray, cos: float) -> np.ndarray:
        noise = rng.standard_normal(DIM)
        noise = _unit(noise - (noise @ base) * base)
        return cos * base + np.sqrt(1 - cos * cos) * noise

    vectors = [face(p, 0.9) for p in people]  # photo 0
    vectors += [face(p, 0.9) for p in people]  # photo 1 (another layout)
    vectors += [face(p, 0.8) for p in people[:3]] + [face(people[3], weak)]
    vectors += [face(people[4], 0.8), face(stranger, 0.9)]  # photo 2
    boxes = np.concatenate(
        [
            _boxes(GROUP, 90),
            _boxes(np.random.default_rng(4).uniform(500, 3500, (5, 2)), 90),
            _boxes(np.concatenate([_far(GROUP), [[3600.0, 2500.0]]]), 27),
        ]
    )
    photos = np.repeat([0, 1, 2], [5, 5, 6])
    labels = np.array([0, 1, 2, 3, 4] * 2 + [0, 1, 2, -1, 4, -1])
    small = np.array([False] * 10 + [True] * 6)
    clustering = Clustering(labels, np.full(16, -1), np.full(16, np.nan, np.float32))
    return clustering, np.asarray(vectors, np.float32), photos, boxes, small


def test_a_small_face_follows_the_large_face_at_its_place() -> None:
    clustering, vectors, photos, boxes, small = _album(weak=0.35)
    out = follow_near_duplicates(clustering, vectors, photos, boxes, small)
    assert out.labels[13] == 3
    assert out.matched_face[13] == 3  # the large face at its place in photo 0
    assert out.labels[15] == -1  # the stranger stays in "others"
    assert list(out.labels[:13]) == list(clustering.labels[:13])


def test_a_face_whose_embedding_contradicts_the_layout_stays_in_others() -> None:
    clustering, vectors, photos, boxes, small = _album(weak=0.05)
    out = follow_near_duplicates(clustering, vectors, photos, boxes, small)
    assert out.labels[13] == -1
    # closer to another person's folder than to the one at its place
    clustering, vectors, photos, boxes, small = _album(weak=0.35)
    vectors[13] = _unit(vectors[13] + 2 * vectors[0])
    assert follow_near_duplicates(clustering, vectors, photos, boxes, small).labels[13] == -1


def test_a_cannot_link_or_a_disagreeing_shot_keeps_the_face_out() -> None:
    clustering, vectors, photos, boxes, small = _album(weak=0.35)
    out = follow_near_duplicates(clustering, vectors, photos, boxes, small, cannot_link=[(13, 8)])
    assert out.labels[13] == -1
    # the grouped faces of the two shots disagree: not the same group standing the same way
    labels = clustering.labels.copy()
    labels[[10, 11, 12]] = [1, 2, 0]
    disagreeing = Clustering(labels, clustering.matched_face, clustering.similarity)
    assert follow_near_duplicates(disagreeing, vectors, photos, boxes, small).labels[13] == -1
    # without small faces nothing moves
    assert follow_near_duplicates(clustering, vectors, photos, boxes, None) is clustering


@pytest.mark.parametrize("on", [True, False])
def test_the_trip_folder_plan_applies_the_rule(on: bool) -> None:
    _, vectors, photos, boxes, _ = _album(weak=0.3)
    sizes = [90.0] * 10 + [20.0] * 6  # the far shot's faces are tiny (under 0.6 x 40)
    faces = [
        TripFace(
            photo_id=100 + int(p),
            embedding=np.asarray(v, np.float32),
            score=0.9,
            box=tuple(float(x) for x in b),  # type: ignore[arg-type]
            chip_size=s,
        )
        for v, p, b, s in zip(vectors, photos, boxes, sizes, strict=True)
    ]
    # a third photo of each person, so each folder is an established group
    rng = np.random.default_rng(5)
    for k in range(5):
        base = np.mean([vectors[k], vectors[5 + k]], axis=0)
        v = _unit(base + 0.2 * _unit(rng.standard_normal(DIM)))
        faces.append(
            TripFace(
                photo_id=110 + k, embedding=v.astype(np.float32), score=0.9, box=(0, 0, 90, 90)
            )
        )
    rule = GroupingRule(
        method="default", embedder="w600k_mbf", threshold=0.34, small_face=40, near_duplicates=on
    )
    plan = plan_folders(
        faces,
        folders=[],
        directions={},
        analysed_photos=sorted({f.photo_id for f in faces}),
        shared=SHARED,
        rule=rule,
    )
    person3 = plan.folders[3]
    assert person3 != SHARED.others
    assert (plan.folders[13] == person3) is on
    assert plan.folders[15] == SHARED.others


@pytest.mark.parametrize("on", [True, False])
def test_the_result_file_applies_the_rule(on: bool) -> None:
    _, vectors, photos, boxes, _ = _album(weak=0.3)
    analyzed = []
    rng = np.random.default_rng(6)
    for p in range(3):
        mine = photos == p
        analyzed.append(
            AnalyzedPhoto(
                photo_id=f"p{p}",
                name=f"p{p}.jpg",
                status=PhotoStatus.OK,
                error=None,
                width=4000,
                height=3000,
                detections=Detections(
                    boxes[mine],
                    np.full(int(mine.sum()), 0.9, np.float32),
                    np.zeros((int(mine.sum()), 5, 2), np.float32),
                ),
                embeddings=vectors[mine],
                working_scale=0.7 if p == 2 else 1.0,  # the far shot's faces: 19 px, tiny
            )
        )
    for k in range(5):  # a third photo of each person
        v = _unit(vectors[k] + vectors[5 + k] + 0.3 * _unit(rng.standard_normal(DIM)))
        analyzed.append(
            AnalyzedPhoto(
                photo_id=f"q{k}",
                name=f"q{k}.jpg",
                status=PhotoStatus.OK,
                error=None,
                width=400,
                height=300,
                detections=Detections(
                    np.array([[10, 10, 100, 100]], np.float32),
                    np.array([0.9], np.float32),
                    np.zeros((1, 5, 2), np.float32),
                ),
                embeddings=v[None].astype(np.float32),
            )
        )
    album = assemble_album(
        analyzed,
        PipelineSettings(near_duplicates=on),
        models=[],
        timer=StageTimer(),
        embedder="w600k_mbf",
        dim=DIM,
    )
    assert album.faces[3].group >= 0
    assert (album.faces[13].group == album.faces[3].group) is on
    assert album.faces[15].group < 0
