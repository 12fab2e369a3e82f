"""The ``id`` component: multi-subject fidelity by one-to-one matching (MultiCrafter Eq. 10).

For each image and each subject kind it has references of, an embedder finds candidate subjects in the
generated image (faces; objects grounded by the references' captions, or located by the weight-free
shape backend), C[i, j] = similarity(reference
i, candidate j), and the Hungarian assignment picks the pairs. Kinds never match across (a face cannot
stand in for an object), so the matched sums of the kinds add up and

    R_id = (sum over kinds of matched_similarity_sum(C_kind)) / N_ref,

which is Eq. 10 on the block-diagonal matrix with the cross-kind blocks left out.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from rewards.matching import matched_similarity_sum
from rewards.types import InputError, ReferenceSubject, ScoreBatch


class SubjectEmbedder(Protocol):
    """Finds and embeds subjects of one kind. ``similarity`` is the backend's own rule (cosine for
    ArcFace and DINOv2, a distance map for dlib)."""

    kind: str

    def embed_reference(self, subject: ReferenceSubject, where: str) -> np.ndarray:
        """(D,) embedding of the subject in its reference image; InputError naming ``where`` if none is found."""
        ...

    def embed_candidates(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """(M, D) embeddings of the subjects found in a generated image (M may be 0)."""
        ...

    def similarity(self, refs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(N, D), (M, D) -> (N, M)."""
        ...


class IdentityScorer:
    name = "id"
    reads_reference_images = True

    def __init__(self, embedders: Sequence[SubjectEmbedder]):
        self.embedders = {embedder.kind: embedder for embedder in embedders}
        if len(self.embedders) != len(embedders):
            raise ValueError("IdentityScorer: one embedder per subject kind")

    def score(self, batch: ScoreBatch) -> np.ndarray:
        # References are shared by the images of a group: embed each distinct one once per batch.
        reference_cache: dict[tuple[str, str], np.ndarray] = {}
        scores = np.zeros(len(batch))
        for i, (image, subjects) in enumerate(zip(batch.images, batch.references)):
            if not subjects:
                continue
            for j, subject in enumerate(subjects):
                if subject.kind not in self.embedders:
                    raise InputError(
                        f"references[{i}][{j}].kind",
                        f"{subject.kind!r} subjects are not scored here (loaded id kinds: {', '.join(self.embedders)})",
                    )
            matched = 0.0
            for kind, embedder in self.embedders.items():
                indices = [j for j, s in enumerate(subjects) if s.kind == kind]
                if not indices:
                    continue
                refs = []
                for j in indices:
                    key = subjects[j].content_key()
                    if key not in reference_cache:
                        reference_cache[key] = embedder.embed_reference(subjects[j], f"references[{i}][{j}]")
                    refs.append(reference_cache[key])
                candidates = embedder.embed_candidates(image, [subjects[j].caption for j in indices])
                sim = embedder.similarity(np.stack(refs), candidates)  # (N_kind, M)
                matched += matched_similarity_sum(sim)
            scores[i] = matched / len(subjects)
        return scores
