"""Face backends of the ``id`` component: both detect faces, align them by landmarks and embed them.

- insightface (the paper's setup): ``FaceAnalysis`` from a local buffalo_l-style folder, an SCRFD
  detector with 5 landmarks and an ArcFace recognizer on 112 x 112 crops aligned by those landmarks;
  similarity is the cosine of the embeddings. ONNX Runtime providers come from the config.
- dlib (the offline CPU default): dlib's HOG detector, its 5-point shape predictor and its 128-d ResNet
  recognizer (150 x 150 aligned chips), with the weights that the ``face-recognition-models`` package
  ships. Its descriptors are not zero-centred, so similarity is a map of the L2 distance
  (``distance_similarity_matrix``), not the cosine.

A reference image may show more than its subject; its largest detected face is the reference.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from rewards.config import FaceConfig
from rewards.matching import cosine_similarity_matrix, distance_similarity_matrix
from rewards.paths import require_path
from rewards.types import InputError, ReferenceSubject

logger = logging.getLogger(__name__)

DLIB_SHAPE_PREDICTOR = "shape_predictor_5_face_landmarks.dat"
DLIB_RECOGNIZER = "dlib_face_recognition_resnet_model_v1.dat"


class DetectedFaces(NamedTuple):
    boxes: np.ndarray  # (F, 4) x0, y0, x1, y1 in pixels
    scores: np.ndarray  # (F,) detector confidence
    embeddings: np.ndarray  # (F, D)


def main_face(faces: DetectedFaces) -> int:
    """Index of the reference's subject: the largest box, the more confident one among equal sizes."""
    areas = (faces.boxes[:, 2] - faces.boxes[:, 0]) * (faces.boxes[:, 3] - faces.boxes[:, 1])  # (F,)
    return int(np.lexsort((faces.scores, areas))[-1])  # sorts by area, then score


class _FaceEmbedder:
    """Shared reference logic; subclasses provide ``detect_and_embed`` and ``similarity``."""

    kind = "face"

    def detect_and_embed(self, image: np.ndarray) -> DetectedFaces:
        """image (H, W, 3) uint8 RGB -> every detected face, embedded."""
        raise NotImplementedError

    def embed_reference(self, subject: ReferenceSubject, where: str) -> np.ndarray:
        faces = self.detect_and_embed(subject.image)
        if len(faces.boxes) == 0:
            raise InputError(f"{where}.image", "no face detected in the reference image")
        return faces.embeddings[main_face(faces)]

    def embed_candidates(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        return self.detect_and_embed(image).embeddings


def dlib_model_dir(configured: str) -> Path:
    """The configured folder, or the one inside the installed face_recognition_models package (located
    without importing it: its __init__ needs pkg_resources)."""
    if configured:
        return require_path(
            configured,
            "face.dlib_model_dir",
            f"{DLIB_SHAPE_PREDICTOR} and {DLIB_RECOGNIZER}",
            is_dir=True,
        )
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "face.dlib_model_dir is empty and the face-recognition-models package is not installed; "
            f"install it or point face.dlib_model_dir at a folder with {DLIB_SHAPE_PREDICTOR} and {DLIB_RECOGNIZER}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibFaceEmbedder(_FaceEmbedder):
    def __init__(self, cfg: FaceConfig):
        import dlib

        folder = dlib_model_dir(cfg.dlib_model_dir)
        shape_path = require_path(
            folder / DLIB_SHAPE_PREDICTOR, "face.dlib_model_dir", "dlib's 5-point face landmark model"
        )
        recognizer_path = require_path(
            folder / DLIB_RECOGNIZER, "face.dlib_model_dir", "dlib's 128-d face recognition ResNet"
        )
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(shape_path))
        self.recognizer = dlib.face_recognition_model_v1(str(recognizer_path))
        self.upsample = cfg.dlib_upsample
        self.same_person_distance = cfg.dlib_same_person_distance
        self._detections = dlib.full_object_detections

    def detect_and_embed(self, image: np.ndarray) -> DetectedFaces:
        image = np.ascontiguousarray(image)
        rects, scores, _ = self.detector.run(image, self.upsample, 0.0)
        if len(rects) == 0:
            return DetectedFaces(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 128)))
        shapes = self._detections()
        for rect in rects:
            shapes.append(self.shape_predictor(image, rect))
        descriptors = self.recognizer.compute_face_descriptor(image, shapes)  # aligned 150x150 chips
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], dtype=np.float64)
        return DetectedFaces(boxes, np.asarray(scores, dtype=np.float64), np.array([list(d) for d in descriptors]))

    def similarity(self, refs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return distance_similarity_matrix(refs, candidates, self.same_person_distance)


class InsightFaceEmbedder(_FaceEmbedder):
    def __init__(self, cfg: FaceConfig):
        from insightface.app import FaceAnalysis

        # Checked here: FaceAnalysis would try to download a model pack for a name that is not a folder.
        folder = require_path(
            cfg.insightface_dir,
            "face.insightface_dir",
            "an insightface model pack (SCRFD detector + ArcFace recognizer ONNX files, e.g. buffalo_l)",
            is_dir=True,
        )
        if not list(folder.glob("*.onnx")):
            raise FileNotFoundError(
                f"{folder}: no .onnx files; it should hold an SCRFD detector and an ArcFace recognizer"
            )
        import onnxruntime

        # face.providers is a preference list: the ones this onnxruntime build has are used, in order.
        available = onnxruntime.get_available_providers()
        providers = [p for p in cfg.providers if p in available]
        if not providers:
            raise ValueError(
                f"face.providers: none of {', '.join(cfg.providers)} is available in this onnxruntime (available: "
                f"{', '.join(available)}); CUDAExecutionProvider needs onnxruntime-gpu instead of onnxruntime"
            )
        if len(providers) < len(cfg.providers):
            logger.warning(
                "face.providers: %s not available in this onnxruntime; running on %s",
                ", ".join(p for p in cfg.providers if p not in available),
                ", ".join(providers),
            )
        self.providers = providers
        try:
            self.app = FaceAnalysis(
                name=str(folder.resolve()), providers=providers, allowed_modules=["detection", "recognition"]
            )
        except AssertionError:  # FaceAnalysis asserts that it found a detector
            raise FileNotFoundError(
                f"{folder}: no SCRFD face detector (an ONNX file with >= 5 outputs: scores, boxes, keypoints)"
            ) from None
        if "recognition" not in self.app.models:
            raise FileNotFoundError(
                f"{folder}: no ArcFace recognizer (an ONNX file with a square >= 112 input and one output)"
            )
        self.app.prepare(ctx_id=0, det_thresh=cfg.det_thresh, det_size=tuple(cfg.det_size))

    def detect_and_embed(self, image: np.ndarray) -> DetectedFaces:
        faces = self.app.get(np.ascontiguousarray(image[:, :, ::-1]))  # insightface takes BGR
        if not faces:
            return DetectedFaces(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 1)))
        return DetectedFaces(
            boxes=np.stack([face.bbox[:4] for face in faces]).astype(np.float64),
            scores=np.array([float(face.det_score) for face in faces]),
            embeddings=np.stack([face.normed_embedding for face in faces]).astype(np.float64),
        )

    def similarity(self, refs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return cosine_similarity_matrix(refs, candidates)


def build_face_embedder(cfg: FaceConfig) -> _FaceEmbedder:
    return DlibFaceEmbedder(cfg) if cfg.backend == "dlib" else InsightFaceEmbedder(cfg)
