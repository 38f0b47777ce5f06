"""Grouping: the prototype's greedy port, the default method on hand-made embeddings, and the
default against the prototype on the team's dev sets."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from tests.support.vectors import vectors_with_gram
from worker.cluster import (
    ConstraintConflict,
    InvalidConstraint,
    UnknownGraphIndex,
    UnknownGroupingMethod,
    cluster_faces,
    default_threshold,
    seed_grouping,
    similarity_graph,
)

# --- helpers ---------------------------------------------------------------------------------


def people(
    sizes: list[int], *, spread: float, seed: int = 0, dim: int = 64
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Faces of len(sizes) people around random orthogonal identities, and who is who.

    `spread` is the noise per dimension: with dim 64, spread 0.12 gives same-person cosine
    similarity around 0.5 and different people around 0.
    """
    rng = np.random.default_rng(seed)
    identity = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: len(sizes)]
    truth = np.repeat(np.arange(len(sizes)), sizes)
    x = identity[truth] + rng.normal(scale=spread, size=(len(truth), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def same_partition(labels: NDArray[np.int64], truth: NDArray[np.int64]) -> bool:
    """Whether two labelings group the items identically (names of groups aside)."""
    pairs_a = labels[:, None] == labels[None, :]
    pairs_b = truth[:, None] == truth[None, :]
    return bool((pairs_a == pairs_b).all())


# --- seed: the prototype's quirks, on hand-made similarity matrices --------------------------


def test_seed_first_group_wins_even_when_another_is_closer() -> None:
    # Faces 0 and 1 open two groups; face 2 is above the cut with both, closer to 1.
    sim = np.array([[1.0, 0.1, 0.5], [0.1, 1.0, 0.9], [0.5, 0.9, 1.0]])
    groups = seed_grouping(sim, 0.45)
    assert [g.faces for g in groups] == [[0, 2], [1]]
    assert groups[0].matched == [None, 0]


def test_seed_records_first_matching_face_not_best() -> None:
    sim = np.array(
        [
            [1.0, 0.6, 0.5],
            [0.6, 1.0, 0.95],
            [0.5, 0.95, 1.0],
        ]
    )
    groups = seed_grouping(sim, 0.45)
    assert [g.faces for g in groups] == [[0, 1, 2]]
    # Face 2 matches both 0 (0.5) and 1 (0.95): the prototype records the first, face 0.
    assert groups[0].matched == [None, 0, 0]
    assert groups[0].similarity == [-1.0, 0.6, 0.5]


def test_seed_clips_similarity_to_unit_interval() -> None:
    sim = np.array([[1.0, 1.3], [1.3, 1.0]])
    groups = seed_grouping(sim, 0.45)
    assert groups[0].similarity == [-1.0, 1.0]
    # A negative similarity is clipped to 0, which is above a negative threshold.
    negative = np.array([[1.0, -0.5], [-0.5, 1.0]])
    assert [g.faces for g in seed_grouping(negative, -0.1)] == [[0, 1]]
    assert [g.faces for g in seed_grouping(negative, 0.0)] == [[0], [1]]


def test_seed_needs_strictly_greater_than_threshold() -> None:
    sim = np.array([[1.0, 0.45], [0.45, 1.0]])
    assert [g.faces for g in seed_grouping(sim, 0.45)] == [[0], [1]]
    assert [g.faces for g in seed_grouping(sim, 0.4499)] == [[0, 1]]


def test_seed_through_cluster_faces_matches_prototype_groups() -> None:
    gram = np.array(
        [
            [1.0, 0.6, 0.1, 0.0, 0.5],
            [0.6, 1.0, 0.1, 0.0, 0.2],
            [0.1, 0.1, 1.0, 0.1, 0.0],
            [0.0, 0.0, 0.1, 1.0, 0.0],
            [0.5, 0.2, 0.0, 0.0, 1.0],
        ]
    )
    emb = vectors_with_gram(gram)
    result = cluster_faces(emb, np.arange(5), method="seed", threshold=0.45)
    # Groups of one face are "others" (-1), as in the prototype's SINGLE_FACE_GROUP.
    assert result.labels.tolist() == [0, 0, -1, -1, 0]
    assert result.matched_face.tolist() == [-1, 0, -1, -1, 0]
    np.testing.assert_allclose(result.similarity[[1, 4]], [0.6, 0.5], atol=1e-5)
    assert np.isnan(result.similarity[[0, 2, 3]]).all()
    # The seed ignores photos: two faces of one photo may share a group.
    same_photo = cluster_faces(emb, np.zeros(5, np.int64), method="seed", threshold=0.45)
    assert same_photo.labels.tolist() == [0, 0, -1, -1, 0]


def test_seed_threshold_defaults_to_the_prototype_value() -> None:
    assert default_threshold("seed", "w600k_mbf") == 0.45
    assert default_threshold("seed", "some-other-model") == 0.45


def test_unknown_method_is_refused() -> None:
    with pytest.raises(UnknownGroupingMethod, match="nope"):
        cluster_faces(np.eye(2, dtype=np.float32), np.arange(2), method="nope")


def test_no_faces() -> None:
    for method in ("default", "seed"):
        result = cluster_faces(np.zeros((0, 512), np.float32), np.zeros(0, np.int64), method=method)
        assert result.labels.shape == (0,)


# --- default: hand-made embeddings where the right answer is known ----------------------------


def test_default_does_not_chain_what_single_linkage_merges() -> None:
    # Eight faces in a chain: each is 0.5 similar to its neighbours, 0.25 to the next ones...
    # Single linkage at the default cut joins all eight; average linkage keeps pairs apart.
    idx = np.arange(8)
    gram = 0.5 ** np.abs(idx[:, None] - idx[None, :])
    emb = vectors_with_gram(gram)
    cut = default_threshold("default", "w600k_mbf")
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    n_single, _ = connected_components(csr_matrix(gram > cut), directed=False)
    assert n_single == 1
    labels = cluster_faces(emb, idx).labels
    assert len(np.unique(labels[labels >= 0])) >= 3
    assert np.bincount(labels[labels >= 0]).max() <= 3


def test_default_bridge_face_does_not_join_two_people() -> None:
    # Two people of four faces (0.7 within, 0 across) and one face 0.45 similar to all eight.
    gram = np.zeros((9, 9))
    gram[:4, :4] = gram[4:8, 4:8] = 0.7
    gram[8, :8] = gram[:8, 8] = 0.45
    np.fill_diagonal(gram, 1.0)
    labels = cluster_faces(vectors_with_gram(gram), np.arange(9)).labels
    assert len(set(labels[:4])) == 1 and len(set(labels[4:8])) == 1
    assert labels[0] != labels[4] and labels[0] >= 0 and labels[4] >= 0


def test_default_recovers_people_and_leaves_strangers_alone() -> None:
    emb, truth = people([6, 9, 4, 12, 1, 1, 1, 1, 1], spread=0.12, seed=3)
    labels = cluster_faces(emb, np.arange(len(truth))).labels
    strangers = np.isin(truth, [4, 5, 6, 7, 8])
    assert (labels[strangers] == -1).all()
    assert same_partition(labels[~strangers], truth[~strangers])
    # People are numbered in the order their first face appears.
    assert labels[~strangers][[0, 6, 15, 19]].tolist() == [0, 1, 2, 3]


def test_default_never_groups_two_faces_of_one_photo() -> None:
    # Photo 0 holds two faces of one identity (a mirror selfie, a poster): same embedding.
    emb, truth = people([6, 6], spread=0.1, seed=1)
    emb = np.concatenate([emb, emb[:1]])
    photos = np.concatenate([np.arange(12), [0]])
    result = cluster_faces(emb, photos)
    for label in np.unique(result.labels[result.labels >= 0]):
        members = np.flatnonzero(result.labels == label)
        assert len(np.unique(photos[members])) == len(members)
    assert result.labels[0] != result.labels[12]


def two_looks(size: int, within: float, across: float) -> NDArray[np.float32]:
    """Faces of two looks of `size` faces each: `within` a look, `across` the two."""
    gram = np.full((2 * size, 2 * size), across)
    gram[:size, :size] = gram[size:, size:] = within
    np.fill_diagonal(gram, 1.0)
    return vectors_with_gram(gram)


def test_default_keeps_a_person_whole_across_a_collage() -> None:
    # One person, two looks (0.7 within each, 0.45 across: one person by the mean), and one
    # collage photo that shows both looks. The two looks still merge; the collage's second
    # face leaves the group, so a group never holds two faces of one photo.
    emb = two_looks(12, 0.7, 0.45)
    photos = np.arange(24)
    photos[12] = 0  # faces 0 and 12 are one photo
    labels = cluster_faces(emb, photos).labels
    assert (labels == -1).sum() == 1 and labels[[0, 12]].min() == -1
    assert len(np.unique(labels[labels >= 0])) == 1
    # Small groups never tolerate a shared photo: five and five faces stay two people.
    emb = two_looks(5, 0.7, 0.45)
    photos = np.arange(10)
    photos[5] = 0
    labels = cluster_faces(emb, photos).labels
    assert (labels >= 0).all() and labels[0] != labels[5]
    assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1


def test_default_keeps_look_alikes_who_are_photographed_together_apart() -> None:
    # Two people who look alike (0.4 on average, above the cut) and appear together in 4 of
    # their 10 photos each: too many shared photos for one person, so they stay two.
    emb = two_looks(10, 0.7, 0.4)
    photos = np.concatenate([np.arange(10), [0, 1, 2, 3], np.arange(14, 20)])
    labels = cluster_faces(emb, photos).labels
    assert len(set(labels[:10])) == 1 and len(set(labels[10:])) == 1
    assert labels[0] != labels[10] and (labels >= 0).all()
    # Sharing a single photo, the same faces would be one person (that photo's twin aside).
    photos = np.concatenate([np.arange(10), [0], np.arange(11, 20)])
    labels = cluster_faces(emb, photos).labels
    assert len(np.unique(labels[labels >= 0])) == 1 and (labels == -1).sum() == 1


def test_default_attaches_a_loner_to_the_group_it_resembles() -> None:
    # A face 0.3 similar to each of four faces of one person: under the cut for a pair, but a
    # steady mean over the whole group. It joins, unless its photo is already in the group.
    gram = np.full((5, 5), 0.7)
    gram[4, :4] = gram[:4, 4] = 0.3
    np.fill_diagonal(gram, 1.0)
    emb = vectors_with_gram(gram)
    assert cluster_faces(emb, np.arange(5)).labels.tolist() == [0, 0, 0, 0, 0]
    assert cluster_faces(emb, np.array([0, 1, 2, 3, 3])).labels.tolist() == [0, 0, 0, 0, -1]
    # Below the attach bar it stays in "others".
    gram[4, :4] = gram[:4, 4] = 0.2
    labels = cluster_faces(vectors_with_gram(gram), np.arange(5)).labels
    assert labels.tolist() == [0, 0, 0, 0, -1]


def test_default_weak_faces_found_no_group_but_may_join_one() -> None:
    # Four clear faces of one person; two low-confidence detections (say, two blurred shots
    # of one poster in the background) that look alike; one weak face of the person.
    gram = np.eye(7)
    gram[:4, :4] = 0.7
    gram[4, 5] = gram[5, 4] = 0.8
    gram[6, :4] = gram[:4, 6] = 0.5
    np.fill_diagonal(gram, 1.0)
    emb = vectors_with_gram(gram)
    quality = np.array([0.99, 0.99, 0.98, 0.97, 0.75, 0.8, 0.85])
    labels = cluster_faces(emb, np.arange(7), quality=quality, min_quality=0.9).labels
    assert labels.tolist() == [0, 0, 0, 0, -1, -1, 0]
    # Without quality, the two look-alike detections would make a "person" of their own.
    assert cluster_faces(emb, np.arange(7)).labels.tolist() == [0, 0, 0, 0, 1, 1, 0]


def test_default_explains_each_face() -> None:
    emb, truth = people([5, 5, 1], spread=0.12, seed=7)
    result = cluster_faces(emb, np.arange(len(truth)))
    sim = emb @ emb.T
    for face, label in enumerate(result.labels):
        match = result.matched_face[face]
        if label < 0:
            assert match == -1 and np.isnan(result.similarity[face])
            continue
        assert result.labels[match] == label and match != face
        assert result.similarity[face] == pytest.approx(sim[face, match], abs=1e-5)


def test_default_groups_a_big_trip() -> None:
    # 3000 faces of 40 people, three people per photo: the grouping stays exact.
    emb, truth = people([75] * 40, spread=0.07, seed=11, dim=128)
    # Interleave people (k-th face of everyone, then the (k+1)-th...) so that the three faces
    # of each photo are three different people.
    order = np.argsort(np.tile(np.arange(75), 40), kind="stable")
    emb, truth = emb[order], truth[order]
    photos = np.arange(len(truth)) // 3
    labels = cluster_faces(emb, photos).labels
    assert (labels >= 0).all()
    assert same_partition(labels, truth)


# --- constraints: a person's corrections --------------------------------------------------------


def two_people(size: int = 4, within: float = 0.7) -> NDArray[np.float32]:
    """Two people of `size` faces each, `within` alike, nothing alike across."""
    return two_looks(size, within, 0.0)


def test_must_link_joins_faces_that_look_nothing_alike() -> None:
    emb = two_people()
    plain = cluster_faces(emb, np.arange(8)).labels
    assert plain[0] != plain[4]
    labels = cluster_faces(emb, np.arange(8), must_link=[[0, 4]]).labels
    assert labels[0] == labels[4] >= 0
    # A set never splits, whatever linkage then does: three faces from the two people.
    labels = cluster_faces(emb, np.arange(8), must_link=[[0, 4], [4, 5]]).labels
    assert labels[0] == labels[4] == labels[5] >= 0


def test_must_link_holds_for_weak_faces_and_loners() -> None:
    # A face that matches nothing (a stranger by similarity) and is a weak detection, linked by
    # a person to two faces of a group (its "anchors"): it ends in that group.
    gram = np.eye(6)
    gram[:5, :5] = 0.7
    gram[5, :5] = gram[:5, 5] = -0.05
    np.fill_diagonal(gram, 1.0)
    emb = vectors_with_gram(gram)
    quality = np.array([0.99] * 5 + [0.5])
    kwargs: dict[str, Any] = {"quality": quality, "min_quality": 0.9}
    assert cluster_faces(emb, np.arange(6), **kwargs).labels[5] == -1
    labels = cluster_faces(emb, np.arange(6), must_link=[[5, 0, 1]], **kwargs).labels
    assert labels.tolist() == [0] * 6
    # Two lone weak faces linked together are a group of their own.
    gram = np.eye(4)
    gram[:2, :2] = 0.8
    np.fill_diagonal(gram, 1.0)
    labels = cluster_faces(
        vectors_with_gram(gram),
        np.arange(4),
        quality=np.array([0.99, 0.99, 0.5, 0.5]),
        min_quality=0.9,
        must_link=[[2, 3]],
    ).labels
    assert labels.tolist() == [0, 0, 1, 1]


def test_a_must_linked_face_is_never_the_one_a_photo_gives_up() -> None:
    # Five faces of a person; face 5 (less like them) is in the photo of face 1. Unlinked, face
    # 5 is left out; linked to faces 0 and 2, it stays and face 1 leaves.
    gram = np.eye(6)
    gram[:5, :5] = 0.7
    gram[5, :5] = gram[:5, 5] = 0.5
    np.fill_diagonal(gram, 1.0)
    emb = vectors_with_gram(gram)
    photos = np.array([0, 1, 2, 3, 4, 1])
    assert cluster_faces(emb, photos).labels.tolist() == [0, 0, 0, 0, 0, -1]
    labels = cluster_faces(emb, photos, must_link=[[5, 0, 2]]).labels
    assert labels.tolist() == [0, -1, 0, 0, 0, 0]
    # The same at the attach stage: a must-linked pair that joins the person by its mean
    # similarity takes the place of the unlinked face of its photo.
    gram = np.eye(7)
    gram[:5, :5] = 0.7
    gram[5:, :5] = gram[:5, 5:] = 0.28
    gram[5, 6] = gram[6, 5] = 0.2
    np.fill_diagonal(gram, 1.0)
    emb = vectors_with_gram(gram)
    photos = np.array([0, 1, 2, 3, 4, 1, 5])
    assert cluster_faces(emb, photos).labels.tolist() == [0, 0, 0, 0, 0, -1, 0]
    labels = cluster_faces(emb, photos, must_link=[[5, 6]]).labels
    assert labels.tolist() == [0, -1, 0, 0, 0, 0, 0]


def test_cannot_link_splits_what_linkage_would_merge() -> None:
    emb = two_people(6)
    labels = cluster_faces(emb, np.arange(12), cannot_link=[(0, 1)]).labels
    assert labels[0] != labels[1] or labels[0] == -1
    assert len(set(labels[6:])) == 1 and labels[6] >= 0


def test_cannot_link_overrides_the_shared_photo_exception() -> None:
    # The collage case: two looks of one person merge although one photo shows both.
    emb = two_looks(12, 0.7, 0.45)
    photos = np.arange(24)
    photos[12] = 0
    assert len(np.unique(cluster_faces(emb, photos).labels)) == 2  # one person and -1
    labels = cluster_faces(emb, photos, cannot_link=[(1, 13)]).labels
    assert len(set(labels[:12])) == 1 and len(set(labels[13:])) == 1
    assert labels[1] != labels[13] and labels[1] >= 0 and labels[13] >= 0


def test_cannot_link_keeps_a_face_from_attaching() -> None:
    gram = np.full((6, 6), 0.7)
    gram[4, :4] = gram[:4, 4] = 0.3
    gram[5, :4] = gram[:4, 5] = 0.28
    gram[4, 5] = gram[5, 4] = 0.0
    np.fill_diagonal(gram, 1.0)
    emb = vectors_with_gram(gram)
    assert cluster_faces(emb, np.arange(6)).labels.tolist() == [0] * 6
    # Cannot-linked to one face of the group: face 4 stays out, face 5 still joins.
    labels = cluster_faces(emb, np.arange(6), cannot_link=[(4, 2)]).labels
    assert labels.tolist() == [0, 0, 0, 0, -1, 0]
    # Cannot-linked to each other: the stronger (4) joins first, then 5 may not.
    labels = cluster_faces(emb, np.arange(6), cannot_link=[(5, 4)]).labels
    assert labels.tolist() == [0, 0, 0, 0, 0, -1]


def test_must_link_sets_of_one_photo_never_merge() -> None:
    # Two must-linked pairs whose faces share photos: they may not end as one group even if
    # their faces are one person by similarity (one of them would have to leave).
    gram = np.full((4, 4), 0.8)
    np.fill_diagonal(gram, 1.0)
    labels = cluster_faces(
        vectors_with_gram(gram), np.array([0, 1, 0, 2]), must_link=[[0, 1], [2, 3]]
    ).labels
    assert labels[0] == labels[1] >= 0 and labels[2] == labels[3] >= 0
    assert labels[0] != labels[2]


def test_contradicting_constraints_are_refused() -> None:
    emb = two_people()
    with pytest.raises(ConstraintConflict, match="cannot-linked"):
        # 0-1 and 1-2 make 0 and 2 one person; the pair says they are two.
        cluster_faces(emb, np.arange(8), must_link=[[0, 1], [1, 2]], cannot_link=[(2, 0)])
    with pytest.raises(ConstraintConflict, match="one photo"):
        cluster_faces(emb, np.array([0, 0, 1, 2, 3, 4, 5, 6]), must_link=[[0, 1]])
    with pytest.raises(InvalidConstraint, match="8 faces"):
        cluster_faces(emb, np.arange(8), must_link=[[0, 8]])
    with pytest.raises(InvalidConstraint, match="itself"):
        cluster_faces(emb, np.arange(8), cannot_link=[(3, 3)])
    with pytest.raises(InvalidConstraint, match="seed"):
        cluster_faces(emb, np.arange(8), method="seed", cannot_link=[(0, 1)])
    assert issubclass(ConstraintConflict, ValueError) and issubclass(InvalidConstraint, ValueError)


def test_constraints_already_met_change_nothing() -> None:
    # Seeded random trips with shared photos and weak faces: cannot-links between faces the
    # grouping already separates, and must-link sets of one face, give exactly the same result.
    for seed in range(4):
        rng = np.random.default_rng(seed)
        emb, truth = people(list(rng.integers(1, 30, size=25)), spread=0.12, seed=seed, dim=128)
        photos = rng.integers(0, int(len(truth) * 0.6), size=len(truth))
        quality = rng.uniform(0.7, 1.0, size=len(truth))
        kwargs: dict[str, Any] = {"quality": quality, "min_quality": 0.9}
        plain = cluster_faces(emb, photos, **kwargs)
        grouped = np.flatnonzero(plain.labels >= 0)
        apart = [
            (int(a), int(b))
            for a, b in zip(grouped[:-1], grouped[1:], strict=True)
            if plain.labels[a] != plain.labels[b]
        ]
        assert len(apart) >= 5
        again = cluster_faces(emb, photos, cannot_link=apart, must_link=[[3]], **kwargs)
        for name in ("labels", "matched_face", "similarity"):
            np.testing.assert_array_equal(getattr(again, name), getattr(plain, name))


# --- grouping without an n x n matrix ------------------------------------------------------------


def random_trip(seed: int) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float64]]:
    """A seeded trip: people of 1-30 faces, photos of about two faces, detector scores."""
    rng = np.random.default_rng(seed)
    emb, truth = people(
        list(rng.integers(1, 30, size=25)), spread=0.11 + 0.01 * (seed % 4), seed=seed, dim=128
    )
    photos = rng.integers(0, int(len(truth) * 0.6), size=len(truth))
    return emb, photos, rng.uniform(0.7, 1.0, size=len(truth))


def test_graph_grouping_is_the_dense_grouping() -> None:
    # The product's graph-based grouping against the first, dense implementation (now in
    # bench/): the same labels and matches, similarities up to float32 rounding; with weak
    # faces, and with constraints.
    from bench.dense_grouping import dense_cluster_faces

    for seed in range(6):
        emb, photos, quality = random_trip(seed)
        rng = np.random.default_rng(100 + seed)
        n = len(photos)
        must = [[int(a), int(b)] for a, b in rng.integers(0, n, (6, 2)) if photos[a] != photos[b]]
        cannot = [(int(a), int(b)) for a, b in rng.integers(0, n, (6, 2)) if a != b]
        cannot = [p for p in cannot if not any(set(p) <= set(m) for m in must)]
        variants: list[dict[str, Any]] = [
            {},
            {"quality": quality, "min_quality": 0.9},
            {"must_link": must, "cannot_link": cannot},
        ]
        for kwargs in variants:
            graph = cluster_faces(emb, photos, **kwargs)
            dense = dense_cluster_faces(emb, photos, **kwargs)
            np.testing.assert_array_equal(graph.labels, dense.labels)
            np.testing.assert_array_equal(graph.matched_face, dense.matched_face)
            np.testing.assert_allclose(graph.similarity, dense.similarity, atol=1e-6)
            # The cells index finds the same neighbours on sets this clear.
            cells = cluster_faces(emb, photos, index="cells", **kwargs)
            np.testing.assert_array_equal(cells.labels, dense.labels)


def test_exact_graph_holds_every_pair_above_the_cut() -> None:
    emb, _, _ = random_trip(1)
    sim = emb @ emb.T
    graph = similarity_graph(emb, 0.34, index="exact", neighbours=len(emb))
    a, b = np.nonzero(np.triu(sim > 0.34, k=1))
    assert graph.index == "exact"
    assert set(zip(graph.a.tolist(), graph.b.tolist(), strict=True)) == set(
        zip(a.tolist(), b.tolist(), strict=True)
    )
    np.testing.assert_allclose(graph.similarity, sim[graph.a, graph.b], atol=1e-6)


def test_graph_keeps_each_faces_best_neighbours() -> None:
    emb, _, _ = random_trip(2)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    k = 3
    graph = similarity_graph(emb, 0.34, index="exact", neighbours=k)
    kth = -np.sort(-sim, axis=1)[:, k - 1]
    # Every edge is among the k best of one of its two faces...
    in_a = sim[graph.a, graph.b] >= kth[graph.a] - 1e-6
    in_b = sim[graph.a, graph.b] >= kth[graph.b] - 1e-6
    assert (in_a | in_b).all()
    # ...and every face's k best above the cut are edges.
    edges = set(zip(graph.a.tolist(), graph.b.tolist(), strict=True))
    for face in range(len(emb)):
        for other in np.argsort(-sim[face])[:k]:
            if sim[face, other] > 0.34:
                assert (min(face, other), max(face, other)) in edges
    # Only active faces have edges.
    active = np.arange(len(emb)) % 2 == 0
    sparse = similarity_graph(emb, 0.34, active=active, index="exact")
    assert active[sparse.a].all() and active[sparse.b].all()


def test_cells_graph_finds_pairs_above_the_cut_with_their_exact_similarity() -> None:
    emb, truth = people([12] * 60, spread=0.09, seed=5, dim=128)
    exact = similarity_graph(emb, 0.34, index="exact")
    cells = similarity_graph(emb, 0.34, index="cells")
    n = len(emb)
    found = set((cells.a * n + cells.b).tolist())
    truth_pairs = set((exact.a * n + exact.b).tolist())
    assert found <= truth_pairs
    assert len(found) >= 0.95 * len(truth_pairs)
    np.testing.assert_allclose(
        cells.similarity, (emb[cells.a] * emb[cells.b]).sum(axis=1), atol=1e-5
    )
    labels = cluster_faces(emb, np.arange(n), index="cells").labels
    assert same_partition(labels, truth)


def test_unknown_graph_index_is_refused() -> None:
    with pytest.raises(UnknownGraphIndex, match="faiss-like"):
        cluster_faces(np.eye(3, dtype=np.float32), np.arange(3), index="faiss-like")


# --- the bench's metrics and baseline ---------------------------------------------------------


def test_bench_metrics_on_a_worked_example() -> None:
    from bench.quality import score_clustering

    truth = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 1])
    got = score_clustering(truth, pred)
    assert got["pair_p"] == pytest.approx(0.5) and got["pair_r"] == pytest.approx(0.5)
    assert got["bcubed_p"] == pytest.approx(11 / 15) and got["bcubed_r"] == pytest.approx(11 / 15)
    # Folders: identity 0 -> group 0 (2 of its 3, group of 2); identity 1 -> group 1 (2 of 2,
    # group of 3).
    assert got["folder_p"] == pytest.approx(4 / 5) and got["folder_r"] == pytest.approx(4 / 5)
    perfect = score_clustering(truth, np.array([5, 5, 5, 7, 7]))
    assert all(v == pytest.approx(1.0) for v in perfect.values())
    alone = score_clustering(truth, np.arange(5))
    assert alone["bcubed_p"] == 1.0 and alone["pair_r"] == 0.0 and alone["folder_r"] == 0.0


def test_bench_unfound_and_others_faces_count_as_singletons() -> None:
    from bench.quality import Album, photo_clusters

    album = Album(
        name="t",
        embeddings=np.zeros((3, 4), np.float32),
        flipped=np.zeros((3, 4), np.float32),
        photo_index=np.array([0, 1, 3]),
        quality={},
        labelled=np.array([0, 1, -1, 2]),  # photo 2: no face found
        truth=np.array([0, 0, 1, 1]),
    )
    pred = photo_clusters(np.array([4, -1, 4]), album)
    assert pred[0] == pred[3] and len({pred[0], pred[1], pred[2]}) == 3


def test_immich_port_cores_then_deferred_faces() -> None:
    from bench.quality import immich_dbscan

    # Faces 0-2 are mutual neighbours (cores, min_faces 3); face 3 is close to face 2 only
    # (non-core: deferred, then joins 2's person); face 4 matches nothing but itself.
    gram = np.eye(5)
    gram[0, 1] = gram[0, 2] = gram[1, 2] = 0.8
    gram[2, 3] = 0.6
    gram[0, 3] = gram[1, 3] = 0.45  # cosine distance 0.55: outside max_distance
    gram[3, 4] = 0.1
    gram = np.maximum(gram, gram.T)
    labels = immich_dbscan(vectors_with_gram(gram), max_distance=0.5, min_faces=3)
    assert labels.tolist() == [0, 0, 0, 0, -1]


def test_cells_probed_grow_with_the_number_of_cells() -> None:
    from worker.cluster import CELL_PROBE_SHARE, CELL_PROBES, cell_probes

    assert cell_probes(5) == 5  # fewer cells than probes: every cell
    assert cell_probes(125) == CELL_PROBES  # 20,000 faces: the floor
    # 200,000 faces: a tenth of the 1,250 cells, not 16 of them (1.3 %).
    assert cell_probes(1250) == math.ceil(1250 * CELL_PROBE_SHARE) == 125
    shares = [cell_probes(c) / c for c in (625, 1250, 5000)]
    assert min(shares) >= CELL_PROBE_SHARE


def test_bench_scale_synthetic_people_keep_their_similarities() -> None:
    from bench.scale import Base, bcubed, synthetic_trip

    emb, truth = people([4, 5, 6], spread=0.1, seed=4, dim=64)
    base = Base(emb, truth)
    faces, photo, person = synthetic_trip(base, 60, seed=1)
    assert faces.shape == (60, 64) and len(np.unique(person)) > 3
    np.testing.assert_allclose(np.linalg.norm(faces, axis=1), 1.0, atol=1e-5)
    # Photos of one to three faces.
    assert set(np.bincount(photo)[np.unique(photo)].tolist()) <= {1, 2, 3}
    # A moved copy of a person: its faces as alike as the real person's (a rotation of their
    # part not explained by the mean face, a little noise), unlike the real person's faces.
    sim = faces @ faces.T
    mean_within = [
        sim[np.ix_(m, m)][~np.eye(len(m), dtype=bool)].mean()
        for m in (np.flatnonzero(person == p) for p in np.unique(person))
        if len(m) > 1
    ]
    real = emb @ emb.T
    assert min(mean_within) > real[:4, :4][~np.eye(4, dtype=bool)].mean() - 0.15
    across = sim[person[:, None] != person[None, :]]
    assert across.mean() < min(mean_within) - 0.2
    assert bcubed(person, person)["f1"] == pytest.approx(1.0)
    assert bcubed(person, np.full(60, -1))["p"] == pytest.approx(1.0)


def test_bench_results_keep_marked_sections(tmp_path) -> None:
    from bench.run import write_results
    from bench.scale import replace_marked

    md = tmp_path / "RESULTS.md"
    md.write_text(
        replace_marked("# Benchmark results\n", "scale", "<!-- scale -->\nA\n<!-- /scale -->\n")
    )
    md.write_text(replace_marked(md.read_text(), "scale", "<!-- scale -->\nB\n<!-- /scale -->\n"))
    assert md.read_text().count("<!-- scale -->") == 1 and "\nB\n" in md.read_text()
    # Another benchmark rewriting the file keeps the marked section and ignores its key.
    (tmp_path / "results.json").write_text('{"scale": {"rows": []}}')
    write_results(tmp_path, {"detection": {"machine": {}, "result": {}}})
    text = md.read_text()
    assert "## detection" in text and "<!-- scale -->\nB\n<!-- /scale -->" in text


# --- the dev sets: the default against the prototype -----------------------------------------


PRECISION_SLACK = {"nogizaka": 0.025}
"""How much BCubed precision the default may give up against greedy@0.45, per dev set (0.01
where not listed)."""


@pytest.mark.shared
def test_default_beats_the_prototype_on_the_dev_sets(shared_data) -> None:
    """The default's BCubed F1 beats the prototype's greedy grouping at 0.45 at about the same
    precision: on every dev set already in the bench's face cache (`bench quality` fills it,
    two albums per section), else on twice (whole set) and one celeba album computed now."""
    from bench.quality import (
        SET_MODES,
        Album,
        FaceCache,
        albums_for,
        evaluate,
        list_set,
        load_set,
        sample_albums,
    )
    from worker.settings import PipelineSettings

    faces_dev = shared_data / "faces-dev"
    cache = FaceCache(PipelineSettings())

    def is_cached(name: str) -> bool:
        files = list_set(faces_dev, name).values()
        return all(cache.has(path) for paths in files for path in paths)

    sections: dict[str, list[Album]] = {}
    cached = [name for name in SET_MODES if is_cached(name)]
    for name in cached:
        for key, albums in albums_for(
            name, load_set(faces_dev, name, cache), albums=2, seed=0
        ).items():
            sections[f"{name} {key}"] = albums
    if not cached:
        twice = load_set(faces_dev, "twice", cache)
        sections["twice whole"] = albums_for("twice", twice, albums=1, seed=0)["whole"]
        # 20 celeba identities: 10 for the album, one stranger photo from each of the others.
        celeba = load_set(faces_dev, "celeba", cache, limit=20)
        sections["celeba K=10"] = sample_albums(
            celeba, set_name="celeba", identities=10, albums=1, seed=0
        )
    grouping = {
        "greedy": lambda a: cluster_faces(a.embeddings, a.photo_index, method="seed").labels,
        "default": lambda a: cluster_faces(a.embeddings, a.photo_index).labels,
    }
    for key, albums in sections.items():
        rows = evaluate(albums, grouping)["methods"]
        greedy, default = rows["greedy"], rows["default"]
        assert default["bcubed_f1"] > greedy["bcubed_f1"], (key, rows)
        # Precision may give a little (greedy at 0.45 rarely merges anyone on these sets):
        # 0.01, and on nogizaka 0.025 for its two-person shots, whose largest face the default
        # files with the other member where greedy merges too little to file them at all
        # (measured 2026-11-30 on the whole set: default 0.960, greedy 0.980).
        slack = PRECISION_SLACK.get(key.split()[0], 0.01)
        assert default["bcubed_p"] >= greedy["bcubed_p"] - slack, (key, rows)
