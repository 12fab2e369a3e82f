"""Multi-ID alignment (MultiCrafter Eq. 10): match reference subjects to detected subjects one-to-one.

C[i, j] is the similarity of reference i and detected subject j. Eq. 10 maximises sum_ij C_ij X_ij over
0/1 matrices X with at most one 1 per row and per column, and R_id = (that maximum) / N_ref. Because the
constraints are "at most one", a pair whose similarity is negative is better left unmatched (it would
lower the sum), so the optimum equals the full Hungarian assignment on max(C, 0). A missing subject
contributes 0, and one "average face" that resembles every reference can be matched only once.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def _check_matrix(sim: np.ndarray) -> np.ndarray:
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim: expected an (N_ref, N_gen) matrix, got shape {sim.shape}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("sim: contains NaN or infinite similarities")
    return sim


def matched_similarity_sum(sim: np.ndarray) -> float:
    """max over partial one-to-one assignments X of sum_ij C_ij X_ij (Eq. 10's objective).

    sim: (N_ref, N_gen), either side may be 0. Solved with
    ``scipy.optimize.linear_sum_assignment(max(C, 0), maximize=True)``: clipping at 0 is what lets a pair
    stay unmatched, as the "<= 1" constraints of Eq. 10 allow.
    """
    sim = _check_matrix(sim)
    if sim.size == 0:
        return 0.0
    gain = np.maximum(sim, 0.0)  # (N_ref, N_gen)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return float(gain[rows, cols].sum())


def hungarian_match_score(sim: np.ndarray) -> float:
    """R_id = matched_similarity_sum(C) / N_ref (MultiCrafter Eq. 10).

    sim: (N_ref, N_gen) similarities of reference i to detected subject j; N_gen may be 0 (nothing
    detected: 0.0) or differ from N_ref. With no references (N_ref == 0) there is nothing to preserve and
    the score is 0.0.
    """
    sim = _check_matrix(sim)
    n_ref = sim.shape[0]
    return matched_similarity_sum(sim) / n_ref if n_ref else 0.0


def cosine_similarity_matrix(refs: np.ndarray, gens: np.ndarray) -> np.ndarray:
    """C[i, j] = <a_i, b_j> / (|a_i| |b_j|). refs: (N, D), gens: (M, D) -> (N, M); an all-zero row gives 0."""
    refs = np.asarray(refs, dtype=np.float64)
    gens = np.asarray(gens, dtype=np.float64)
    if refs.ndim != 2 or gens.ndim != 2 or (refs.size and gens.size and refs.shape[1] != gens.shape[1]):
        raise ValueError(f"expected (N, D) and (M, D) embeddings, got {refs.shape} and {gens.shape}")
    if refs.shape[0] == 0 or gens.shape[0] == 0:
        return np.zeros((refs.shape[0], gens.shape[0]))
    a = refs / np.maximum(np.linalg.norm(refs, axis=1, keepdims=True), 1e-12)
    b = gens / np.maximum(np.linalg.norm(gens, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def distance_similarity_matrix(refs: np.ndarray, gens: np.ndarray, same_person_distance: float) -> np.ndarray:
    """S[i, j] = 1 - |a_i - b_j|_2 / d0: 1 for identical descriptors, 0 at dlib's same-person threshold d0
    (0.6), negative beyond, and so never matched (see Eq. 10 above).

    dlib's 128-d descriptors are not zero-centred: the cosine of two different people is ~0.9, which would
    leave the reward almost no contrast, whereas the L2 distance is what dlib was trained to separate.
    Putting the threshold at 0 also means a second copy of one person cannot earn anything from another
    reference it does not resemble. refs: (N, D), gens: (M, D) -> (N, M).
    """
    if same_person_distance <= 0:
        raise ValueError(f"same_person_distance must be > 0, got {same_person_distance}")
    refs = np.asarray(refs, dtype=np.float64)
    gens = np.asarray(gens, dtype=np.float64)
    if refs.shape[0] == 0 or gens.shape[0] == 0:
        return np.zeros((refs.shape[0], gens.shape[0]))
    distance = np.linalg.norm(refs[:, None, :] - gens[None, :, :], axis=-1)  # (N, M)
    return 1.0 - distance / same_person_distance
