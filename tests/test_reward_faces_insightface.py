"""The insightface backend end to end: FaceAnalysis loads an SCRFD-layout detector and an ArcFace-layout
recognizer from a folder of ONNX files exported in this test, detects, aligns by the 5 landmarks to
112 x 112, embeds and matches.

The detector is a real ONNX graph with SCRFD's 9 outputs (scores, box distances, keypoint offsets for
strides 8/16/32). Its "faces" are bright 32 x 32 squares: the stride-32 score is the mean brightness of
each cell, the box is the cell and the 5 keypoints sit where ArcFace's alignment template puts them,
so a detected square is aligned onto exactly the 112 x 112 crop a real face would be. The recognizer is
a small random-init (seeded) conv net with a (1, 3, 112, 112) input and one 512-d output.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime
import pytest
import torch

from rewards import ReferenceSubject, ScoreBatch
from rewards.config import FaceConfig
from rewards.faces import InsightFaceEmbedder
from rewards.identity import IdentityScorer

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # the legacy (dynamo=False) ONNX exporter
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning"),  # inside insightface
]

SIZE = 256  # detector input = test image size, so detector grid and image pixels coincide
CELL = 32
# ArcFace's 5-point template on 112 x 112 (insightface.utils.face_align.arcface_dst), as cell fractions.
ARCFACE_TEMPLATE = (
    np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])
    / 112.0
)


class SquareDetector(torch.nn.Module):
    def forward(self, x: torch.Tensor):  # x: (1, 3, H, W), (pixel - 127.5) / 128
        brightness = x.mean(dim=1, keepdim=True)  # (1, 1, H, W)
        scores, boxes, keypoints = [], [], []
        for stride in (8, 16, 32):
            cells = torch.nn.functional.avg_pool2d(brightness, stride)  # (1, 1, H/s, W/s)
            per_cell = cells.reshape(-1, 1)
            if stride == CELL:
                score = torch.sigmoid(20.0 * (per_cell - 0.3))
            else:
                score = per_cell * 0.0  # only the stride-32 level fires
            ones = torch.ones_like(per_cell)
            # Two anchors per location, consecutive, as SCRFD lays them out.
            scores.append(score.repeat_interleave(2, dim=0))
            # Box distances (left, top, right, bottom) in stride units from the anchor (the cell's corner).
            boxes.append((ones * torch.tensor([[0.0, 0.0, 1.0, 1.0]])).repeat_interleave(2, dim=0))
            kps = torch.tensor(ARCFACE_TEMPLATE, dtype=torch.float32).reshape(1, 10) * stride / CELL
            keypoints.append((ones * kps).repeat_interleave(2, dim=0))
        return (*scores, *boxes, *keypoints)


def _recognizer() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, stride=4),
        torch.nn.Tanh(),
        torch.nn.Conv2d(8, 8, 5, stride=4),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 512),
    ).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("buffalo_tiny")
    with torch.no_grad():
        torch.onnx.export(
            SquareDetector(),
            torch.zeros(1, 3, SIZE, SIZE),
            str(folder / "det_tiny.onnx"),
            dynamo=False,
            input_names=["input.1"],
            output_names=[f"out{i}" for i in range(9)],
            opset_version=17,
        )
        torch.onnx.export(
            _recognizer(),
            torch.zeros(1, 3, 112, 112),
            str(folder / "w_tiny.onnx"),
            dynamo=False,
            input_names=["data"],
            output_names=["fc1"],
            dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}},
            opset_version=17,
        )
    return folder


@pytest.fixture(scope="module")
def embedder(model_dir):
    return InsightFaceEmbedder(
        FaceConfig(
            backend="insightface",
            insightface_dir=str(model_dir),
            providers=("CPUExecutionProvider",),
            det_size=(SIZE, SIZE),
        )
    )


def _face(seed: int) -> np.ndarray:
    """A bright, textured 32 x 32 square (the detector's notion of a face), distinct per seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(170, 256, size=(CELL, CELL, 3), dtype=np.uint8)


def _image(faces_at: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    image = np.full((SIZE, SIZE, 3), 30, np.uint8)
    for (row, col), face in faces_at.items():
        image[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = face
    return image


def test_loads_both_models_from_the_folder_with_configured_providers(embedder, model_dir, caplog):
    models = embedder.app.models
    assert set(models) == {"detection", "recognition"}
    assert models["recognition"].session.get_providers() == ["CPUExecutionProvider"]
    preferred = FaceConfig(
        backend="insightface",
        insightface_dir=str(model_dir),
        providers=("NoSuchExecutionProvider", "CPUExecutionProvider"),
        det_size=(SIZE, SIZE),
    )
    with caplog.at_level("WARNING", logger="rewards.faces"):
        fallback = InsightFaceEmbedder(preferred)
    assert fallback.providers == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider not available" in caplog.text


def test_detects_aligns_to_112_and_embeds(embedder, model_dir):
    a = _face(1)
    faces = embedder.detect_and_embed(_image({(2, 3): a, (5, 1): _face(2)}))
    assert len(faces.boxes) == 2
    np.testing.assert_allclose(sorted(faces.boxes.tolist()), [[32, 160, 64, 192], [96, 64, 128, 96]], atol=1e-3)
    # Independent reference: the recognizer run directly on the square resized to 112 x 112. The
    # landmark alignment must have produced (almost) that crop.
    session = onnxruntime.InferenceSession(str(model_dir / "w_tiny.onnx"), providers=["CPUExecutionProvider"])
    crop = cv2.resize(a, (112, 112), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    direct = session.run(None, {"data": ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]})[0][0]
    found = faces.embeddings[np.argmin(faces.boxes[:, 0] != 96)]
    cosine = direct @ found / np.linalg.norm(direct) / np.linalg.norm(found)
    assert cosine > 0.97


def test_right_faces_score_highest(embedder):
    a, b, c = _face(1), _face(2), _face(3)
    refs = [ReferenceSubject(_image({(3, 3): a}), "face"), ReferenceSubject(_image({(3, 3): b}), "face")]
    images = [
        _image({(1, 1): a, (5, 5): b}),  # right
        _image({(1, 1): a, (5, 5): c}),  # one wrong person
        _image({(1, 1): a, (5, 5): a}),  # the same person twice
        _image({(1, 1): a}),  # one person missing
        _image({}),  # nobody
    ]
    right, wrong, twice, missing, nobody = IdentityScorer([embedder]).score(ScoreBatch(images, [""] * 5, [refs] * 5))
    assert right == pytest.approx(1.0, abs=1e-3)
    assert right > wrong > missing > nobody == 0.0
    assert right > twice
    assert missing == pytest.approx(0.5, abs=1e-3)  # a missing face counts 0


def test_a_folder_without_a_recognizer_fails_at_start_up(tmp_path, model_dir):
    import shutil

    shutil.copy(model_dir / "det_tiny.onnx", tmp_path / "det_tiny.onnx")
    with pytest.raises(FileNotFoundError, match="ArcFace recognizer"):
        InsightFaceEmbedder(FaceConfig(backend="insightface", insightface_dir=str(tmp_path), det_size=(SIZE, SIZE)))
    detector_missing = tmp_path / "recognizer_only"
    detector_missing.mkdir()
    shutil.copy(model_dir / "w_tiny.onnx", detector_missing / "w_tiny.onnx")
    with pytest.raises(FileNotFoundError, match="no SCRFD face detector"):
        InsightFaceEmbedder(FaceConfig(backend="insightface", insightface_dir=str(detector_missing)))
    # Providers are a preference list: missing ones are skipped with a warning; none available is an error.
    with pytest.raises(ValueError, match="face.providers: none of NoSuchExecutionProvider.*CPUExecutionProvider"):
        InsightFaceEmbedder(
            FaceConfig(backend="insightface", insightface_dir=str(model_dir), providers=("NoSuchExecutionProvider",))
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .onnx files"):
        InsightFaceEmbedder(FaceConfig(backend="insightface", insightface_dir=str(empty)))
    with pytest.raises(FileNotFoundError, match="missing folder; it should hold an insightface model pack"):
        InsightFaceEmbedder(FaceConfig(backend="insightface", insightface_dir=str(tmp_path / "absent")))
