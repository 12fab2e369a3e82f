"""The dlib face backend (the offline CPU default) on real photos shipped by installed packages:
scikit-image's astronaut and insightface's six-person group photo ``t1``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rewards import ReferenceSubject, ScoreBatch, hungarian_match_score
from rewards.config import FaceConfig
from rewards.faces import DetectedFaces, DlibFaceEmbedder, main_face
from rewards.identity import IdentityScorer


@pytest.fixture(scope="module")
def embedder():
    return DlibFaceEmbedder(FaceConfig())


@pytest.fixture(scope="module")
def people(embedder):
    """Face crops (with a margin) of the astronaut and of the group photo's six people, largest first."""
    import insightface.data
    import skimage.data

    def crops(image, max_faces):
        faces = embedder.detect_and_embed(image)
        order = np.argsort(-faces.scores)[:max_faces]
        out = []
        for x0, y0, x1, y1 in faces.boxes[order].astype(int):
            m = (x1 - x0) // 2
            out.append(image[max(y0 - m, 0) : y1 + m, max(x0 - m, 0) : x1 + m].copy())
        return out

    group = np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1])  # BGR -> RGB
    return crops(skimage.data.astronaut(), 1) + crops(group, 6)


def _generated(*faces: np.ndarray) -> np.ndarray:
    """A stand-in for a generated image: the given faces, mirrored and resized to 150 px (so no pixel is
    shared with the references), side by side on a grey canvas."""
    canvas = np.full((220, 40 + 190 * len(faces), 3), 120, np.uint8)
    for k, face in enumerate(faces):
        tile = np.asarray(Image.fromarray(face[:, ::-1]).resize((150, 150), Image.BICUBIC))
        canvas[35:185, 20 + 190 * k : 170 + 190 * k] = tile
    return canvas


@pytest.mark.slow  # dlib's HOG detector on full-size photos
def test_detects_the_group_photo_faces(embedder, people):
    assert len(people) == 7
    import insightface.data

    faces = embedder.detect_and_embed(np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1]))
    assert len(faces.boxes) == 6 and faces.embeddings.shape == (6, 128)


@pytest.mark.slow  # dlib's HOG detector on full-size photos
def test_right_faces_beat_wrong_and_duplicated_faces(embedder, people):
    astronaut, p1, p2, p3 = people[0], people[1], people[2], people[3]
    refs = [ReferenceSubject(astronaut, "face"), ReferenceSubject(p1, "face")]
    images = {
        "right": _generated(astronaut, p1),
        "right_swapped_positions": _generated(p1, astronaut),
        "wrong_person": _generated(astronaut, p2),
        "both_wrong": _generated(p2, p3),
        "duplicated": _generated(astronaut, astronaut),
        "one_copy": _generated(astronaut),
        "no_face": np.full((220, 420, 3), 120, np.uint8),
    }
    scores = dict(
        zip(
            images,
            IdentityScorer([embedder]).score(
                ScoreBatch(list(images.values()), [""] * len(images), [refs] * len(images))
            ),
        )
    )
    assert scores["right"] > 0.5  # same person under mirroring and rescaling: well inside dlib's threshold
    assert scores["right_swapped_positions"] == pytest.approx(
        scores["right"], abs=0.02
    )  # order-free (HOG boxes shift a little)
    assert scores["right"] > scores["wrong_person"] + 0.15
    assert scores["wrong_person"] > scores["both_wrong"]
    assert scores["right"] > scores["duplicated"] + 0.15
    assert scores["duplicated"] <= scores["one_copy"] + 1e-9  # a second copy of one person earns nothing
    assert scores["both_wrong"] == 0.0 and scores["no_face"] == 0.0


@pytest.mark.slow  # dlib's HOG detector on full-size photos
def test_similarity_separates_people(embedder, people):
    embeddings = [embedder.detect_and_embed(_generated(face)).embeddings[0] for face in people]
    refs = [embedder.embed_reference(ReferenceSubject(face, "face"), "ref") for face in people]
    sim = embedder.similarity(np.stack(refs), np.stack(embeddings))  # (7, 7)
    assert np.all(np.diag(sim) > 0.3)
    assert np.all(sim[~np.eye(7, dtype=bool)] < 0.1)
    assert hungarian_match_score(sim) == pytest.approx(np.mean(np.diag(sim)))


def test_the_reference_face_is_the_largest_then_the_most_confident():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 25, 25], [0, 0, 5, 5]], dtype=float)
    assert main_face(DetectedFaces(boxes, np.array([0.9, 0.5, 0.7, 1.0]), np.zeros((4, 8)))) == 2
    assert main_face(DetectedFaces(boxes, np.array([0.9, 0.8, 0.7, 1.0]), np.zeros((4, 8)))) == 1
