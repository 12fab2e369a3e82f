"""Hungarian multi-ID matching (MultiCrafter Eq. 10) against brute force, and its anti-hacking properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rewards import (
    cosine_similarity_matrix,
    distance_similarity_matrix,
    hungarian_match_score,
)


def brute_force_score(sim: np.ndarray) -> float:
    """Eq. 10 by enumeration: every partial one-to-one assignment X (each reference matched to at most one
    distinct detected subject, or to none), maximise sum C_ij X_ij, divide by N_ref."""
    n_ref, n_gen = sim.shape
    if n_ref == 0:
        return 0.0
    best = 0.0
    # choice[i] = column of reference i, or None; columns used at most once.
    for choice in itertools.product([None, *range(n_gen)], repeat=n_ref):
        used = [c for c in choice if c is not None]
        if len(used) != len(set(used)):
            continue
        best = max(best, sum(sim[i, c] for i, c in enumerate(choice) if c is not None))
    return best / n_ref


@pytest.mark.parametrize("n_ref", range(0, 6))
@pytest.mark.parametrize("n_gen", range(0, 6))
def test_equals_brute_force_on_random_rectangular_matrices(n_ref, n_gen):
    rng = np.random.default_rng(100 * n_ref + n_gen)
    for _ in range(3):
        sim = rng.uniform(-1.0, 1.0, size=(n_ref, n_gen))
        assert hungarian_match_score(sim) == pytest.approx(brute_force_score(sim), abs=1e-12)


def test_missing_faces_count_zero():
    sim = np.array([[0.9], [0.8], [0.7]])  # three references, one detected face
    assert hungarian_match_score(sim) == pytest.approx(0.9 / 3)
    assert hungarian_match_score(np.zeros((2, 0))) == 0.0


def test_one_average_face_matches_only_one_reference():
    # An "average face" resembles both references (0.8 each); two distinct faces match one each (0.7).
    average_face_only = np.array([[0.8], [0.8]])
    right_faces = np.array([[0.7, 0.1], [0.1, 0.7]])
    assert hungarian_match_score(average_face_only) == pytest.approx(0.4)
    assert hungarian_match_score(right_faces) == pytest.approx(0.7)
    assert hungarian_match_score(right_faces) > hungarian_match_score(average_face_only)


def test_two_copies_of_one_person_score_no_more_than_one_copy():
    # Reference B is a different person: its similarity to A is <= 0 (below the same-person threshold of
    # the dlib map; ~0 for ArcFace), so a second copy of A has nothing to gain from B.
    rng = np.random.default_rng(0)
    ref_a, ref_b = rng.normal(size=(2, 16))
    ref_b = ref_b - (ref_b @ ref_a) / (ref_a @ ref_a) * ref_a  # orthogonal to A: cosine 0
    refs = np.stack([ref_a, ref_b])
    person_a = ref_a + 0.1 * rng.normal(size=16)
    person_b = ref_b + 0.1 * rng.normal(size=16)
    one_copy = cosine_similarity_matrix(refs, person_a[None])
    two_copies = cosine_similarity_matrix(refs, np.stack([person_a, person_a]))
    both_people = cosine_similarity_matrix(refs, np.stack([person_b, person_a]))
    assert hungarian_match_score(two_copies) <= hungarian_match_score(one_copy) + 0.05
    assert hungarian_match_score(both_people) > hungarian_match_score(two_copies) + 0.4
    # The same under the dlib distance map, where "different person" is negative and never matched.
    far_b = ref_a + np.eye(16)[0] * 2.0
    dlib_refs = np.stack([ref_a, far_b])
    one = distance_similarity_matrix(dlib_refs, person_a[None], 0.6)
    two = distance_similarity_matrix(dlib_refs, np.stack([person_a, person_a]), 0.6)
    assert hungarian_match_score(two) == pytest.approx(hungarian_match_score(one))


def test_negative_similarities_are_left_unmatched():
    assert hungarian_match_score(np.array([[-0.5, -0.2]])) == 0.0
    assert hungarian_match_score(np.array([[0.6, -0.9], [-0.9, -0.1]])) == pytest.approx(0.3)


def test_rejects_bad_matrices():
    with pytest.raises(ValueError, match=r"\(N_ref, N_gen\)"):
        hungarian_match_score(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match_score(np.array([[np.nan]]))


def test_cosine_matrix_matches_definition():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    expected = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])
    np.testing.assert_allclose(cosine_similarity_matrix(a, b), expected, atol=1e-12)
    assert cosine_similarity_matrix(a, np.zeros((0, 5))).shape == (3, 0)
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        cosine_similarity_matrix(a, rng.normal(size=(2, 4)))


def test_distance_similarity_map():
    a = np.zeros((1, 4))
    b = np.array([[0.0, 0, 0, 0], [0.6, 0, 0, 0], [1.2, 0, 0, 0], [1.8, 0, 0, 0]])
    np.testing.assert_allclose(distance_similarity_matrix(a, b, 0.6), [[1.0, 0.0, -1.0, -2.0]])
    with pytest.raises(ValueError, match="same_person_distance"):
        distance_similarity_matrix(a, b, 0.0)
