"""Table 1's metrics (rewards/subject_crops.py, rl_align/eval/metrics.py) against independent
computations: CLIP-I with open_clip and DINO-I with transformers' Dinov2Model on tiny random-init models,
brute force over assignments for the matching, Face-Sim with the dlib recognizer on real photos, crops of
a subject at a known box, and the bootstrap intervals against scipy."""

from __future__ import annotations

import itertools

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from rewards.config import ObjectConfig
from rewards.objects import Dinov2Embedder
from rewards.objects import crop_box
from rewards.subject_crops import ClipImageEmbedder, LocatedImage, ShapeLocator, crop_similarity, locate_batch
from rewards.types import ReferenceSubject, ScoreBatch
from rl_align.core.errors import SetupError
from rl_align.core.synthetic import ShapeSubject, render_reference
from rl_align.eval.config import MetricsConfig
from clip_helpers import TINY, register_tiny_clip, tiny_clip
from rl_align.eval.metrics import OVERALL, MetricBackends, Summary, paired_differences, summarize, table_csv, table_markdown

def _images(seed: int, count: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size + 4 * i, size, 3), dtype=np.uint8) for i in range(count)]


def _brute_force_match(sim: np.ndarray) -> float:
    """max over one-to-one partial assignments of the summed similarity, by enumeration."""
    n, m = sim.shape
    best = 0.0
    for k in range(min(n, m) + 1):
        for rows in itertools.combinations(range(n), k):
            for cols in itertools.permutations(range(m), k):
                best = max(best, sum(sim[r, c] for r, c in zip(rows, cols)))
    return best


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    register_tiny_clip(folder)
    model = tiny_clip(seed=0)
    torch.save(model.state_dict(), folder / "clip.bin")
    return folder / "clip.bin", model


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def _located(seed: int) -> list[LocatedImage]:
    """Three images: 2 references vs 3 candidates, 2 references vs 1 candidate (one missing), 1 reference
    vs none; objects and faces mixed in the first."""
    refs, crops = _images(seed, 5), _images(seed + 1, 4, size=24)
    return [
        LocatedImage({"object": refs[:2], "face": [refs[2]]}, {"object": crops[:3], "face": [crops[3]]}),
        LocatedImage({"object": refs[3:5]}, {"object": crops[:1]}),
        LocatedImage({"object": refs[:1]}, {"object": []}),
    ]


def _independent(located: list[LocatedImage], embed) -> np.ndarray:
    scores = []
    for image in located:
        total = 0.0
        for kind, references in image.references.items():
            if image.candidates[kind]:
                sim = np.array([[float(F.cosine_similarity(embed(r), embed(c), dim=-1)) for c in image.candidates[kind]] for r in references])
                total += _brute_force_match(sim)
        scores.append(total / image.reference_count)
    return np.array(scores)


def test_clip_i_is_the_matched_cosine_of_open_clip_image_embeddings(clip_model):
    checkpoint, model = clip_model
    embedder = ClipImageEmbedder.from_checkpoint(TINY, str(checkpoint), "cpu")
    _, _, transform = open_clip.create_model_and_transforms(TINY, pretrained=None)

    def embed(image):
        with torch.no_grad():
            return model.encode_image(transform(Image.fromarray(image))[None])[0]

    located = _located(0)
    got = crop_similarity(located, embedder)
    np.testing.assert_allclose(got, _independent(located, embed), atol=1e-5)
    assert got[2] == 0.0  # nothing located: the reference counts 0


def test_dino_i_is_the_matched_cosine_of_dinov2_pooled_embeddings(dinov2_dir):
    embedder = Dinov2Embedder.from_dir(str(dinov2_dir), "cpu")
    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    processor = BitImageProcessor.from_pretrained(dinov2_dir)

    def embed(image):
        with torch.no_grad():
            return model(pixel_values=processor(images=Image.fromarray(image), return_tensors="pt").pixel_values).pooler_output[0]

    located = _located(5)
    np.testing.assert_allclose(crop_similarity(located, embedder), _independent(located, embed), atol=1e-5)
    assert np.isnan(crop_similarity([LocatedImage({}, {})], embedder)[0])  # no references: does not apply


def test_crop_box_takes_the_box_pixels_rounded_outwards_and_clipped():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    assert np.array_equal(crop_box(image, np.array([2, 3, 7, 9])), image[3:9, 2:7])
    assert np.array_equal(crop_box(image, np.array([2.4, 3.6, 6.2, 8.1])), image[3:9, 2:7])
    assert np.array_equal(crop_box(image, np.array([-5, -2, 40, 30])), image)
    assert crop_box(image, np.array([11.5, 9.5, 11.5, 9.5])).shape == (1, 1, 3)


def test_a_subject_at_a_known_box_is_located_and_cropped_there():
    from rewards.shapes import ShapeSubjectEmbedder

    canvas = np.full((64, 64, 3), 255, np.uint8)
    square = render_reference(ShapeSubject("square", "blue"), 20, margin=0.0)
    canvas[30:50, 8:28] = square
    locator = ShapeLocator(ShapeSubjectEmbedder(ObjectConfig(backend="shapes").shapes))
    boxes = locator.locate(canvas, ["a blue square"])
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0], [8, 30, 28, 50], atol=1)
    crop = crop_box(canvas, boxes[0])
    assert abs(crop.shape[0] - 20) <= 1 and abs(crop.shape[1] - 20) <= 1
    blue = np.all(crop == square[0, 0], axis=-1).mean()
    assert blue > 0.9  # the crop is the square, not the white around it
    reference = ReferenceSubject(square, "object", "a blue square")
    located = locate_batch(ScoreBatch([canvas, np.full((64, 64, 3), 255, np.uint8)], ["p", "p"], [[reference], [reference]]), [locator])
    assert [image.subjects_found() for image in located] == [1, 0]
    assert located[0].references["object"][0] is square  # an object reference is its whole image
    assert located[1].references["object"][0] is square  # a reference shared by images is located once
    other = ReferenceSubject(render_reference(ShapeSubject("circle", "red"), 20), "object", "a red circle")
    pair = locate_batch(ScoreBatch([canvas], ["p"], [[reference, other]]), [locator])[0]
    assert pair.references["object"][0] is square and pair.references["object"][1] is other.image


@pytest.fixture(scope="module")
def people():
    """Face crops with a margin: the astronaut and the group photo's six people (dlib's detector)."""
    import insightface.data
    import skimage.data

    from rewards.config import FaceConfig
    from rewards.faces import DlibFaceEmbedder

    detector = DlibFaceEmbedder(FaceConfig())

    def crops(image, count):
        faces = detector.detect_and_embed(image)
        out = []
        for x0, y0, x1, y1 in faces.boxes[np.argsort(-faces.scores)[:count]].astype(int):
            m = (x1 - x0) // 2
            out.append(image[max(y0 - m, 0) : y1 + m, max(x0 - m, 0) : x1 + m].copy())
        return out

    group = np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1])
    return crops(skimage.data.astronaut(), 1) + crops(group, 3), detector


def _scene(*faces: np.ndarray) -> np.ndarray:
    """A stand-in for a generated image: the faces mirrored, resized to 150 px, side by side on grey."""
    canvas = np.full((220, 40 + 190 * len(faces), 3), 120, np.uint8)
    for k, face in enumerate(faces):
        canvas[35:185, 20 + 190 * k : 170 + 190 * k] = np.asarray(Image.fromarray(face[:, ::-1]).resize((150, 150), Image.BICUBIC))
    return canvas


@pytest.mark.slow  # dlib's HOG detector on real photos
def test_face_sim_on_real_photos_prefers_the_right_person_and_matches_a_duplicate_once(people):
    faces, detector = people
    astronaut, other = (ReferenceSubject(f, "face", "a person") for f in faces[:2])
    backends = MetricBackends(MetricsConfig(metrics=("face_sim", "subjects_found")), frozenset({"face"}))
    images = [_scene(faces[0]), _scene(faces[2]), _scene(faces[0], faces[0]), _scene(faces[0], faces[1])]
    references = [[astronaut], [astronaut], [astronaut, other], [astronaut, other]]
    scores = backends.score(ScoreBatch(images, ["p"] * 4, references))
    right, wrong, duplicated, both = scores["face_sim"]
    assert right > 0.3 and right > wrong + 0.2
    # independent: dlib descriptors by hand, similarity 1 - d / 0.6, best assignment by enumeration, / N_ref
    def descriptor(image):
        found = detector.detect_and_embed(image)
        return found.embeddings[np.argmax((found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1]))]
    refs = np.stack([descriptor(faces[0]), descriptor(faces[1])])
    for image, value in [(images[2], duplicated), (images[3], both)]:
        generated = detector.detect_and_embed(image).embeddings
        sim = 1 - np.linalg.norm(refs[:, None] - generated[None], axis=-1) / 0.6
        assert value == pytest.approx(_brute_force_match(np.maximum(sim, 0)) / 2, abs=1e-9)
    assert duplicated < both and duplicated == pytest.approx(right / 2, abs=0.1)  # the copy cannot earn the other reference
    assert list(scores["subjects_found"]) == [1, 1, 2, 2]


def test_face_sim_does_not_apply_to_object_references():
    backends = MetricBackends(MetricsConfig(metrics=("face_sim",)), frozenset({"object"}))
    scores = backends.score(ScoreBatch(_images(0, 1), ["p"], [[ReferenceSubject(_images(1, 1)[0], "object", "a cup")]]))
    assert np.isnan(scores["face_sim"][0])


def test_a_missing_backend_is_an_error_naming_its_key_and_path(tmp_path):
    for metrics, message in [
        (MetricsConfig(metrics=("clip_t",)), "clip.checkpoint"),
        (MetricsConfig(metrics=("dino_i",), object=ObjectConfig(backend="shapes", dinov2_dir=str(tmp_path / "dino"))), f"object.dinov2_dir.*{tmp_path / 'dino'}"),
        (MetricsConfig(metrics=("subjects_found",), object=ObjectConfig(florence_dir=str(tmp_path / "florence"))), "object.florence_dir"),
    ]:
        with pytest.raises(SetupError, match=message):
            MetricBackends(metrics, frozenset({"object"}))


def test_summaries_against_an_independent_bootstrap():
    rng = np.random.default_rng(0)
    per_task = {"clip_t": rng.normal(0.3, 0.05, 40), "face_sim": rng.normal(0.5, 0.2, 40), "subjects_found": rng.integers(0, 3, 40).astype(float)}
    per_task["face_sim"][:10] = np.nan  # tasks without faces
    out = summarize(per_task, samples=4000, confidence=0.95, seed=1)
    assert out["face_sim"].tasks == 30 and out["clip_t"].tasks == 40
    assert out["face_sim"].mean == pytest.approx(np.mean(per_task["face_sim"][10:]))  # a mean, over the tasks it applies to
    for name in ("clip_t", "face_sim"):
        values = per_task[name][np.isfinite(per_task[name])]
        reference = stats.bootstrap((values,), np.mean, n_resamples=4000, confidence_level=0.95, method="percentile", random_state=3).confidence_interval
        width = reference.high - reference.low
        assert out[name].low == pytest.approx(reference.low, abs=0.1 * width) and out[name].high == pytest.approx(reference.high, abs=0.1 * width)
        assert out[name].low < out[name].mean < out[name].high
    # Overall AVG: the mean of the similarity columns' means (Table 1), not of the count
    assert out[OVERALL].mean == pytest.approx((out["clip_t"].mean + out["face_sim"].mean) / 2)
    assert out[OVERALL].low < out[OVERALL].mean < out[OVERALL].high
    constant = summarize({"clip_t": np.full(5, 0.25)}, 100, 0.95, 0)["clip_t"]
    assert constant == Summary(0.25, 0.25, 0.25, 5)
    assert summarize(per_task, 4000, 0.95, 1) == out  # seeded: the same resamples for every policy


def test_paired_differences_against_an_independent_paired_bootstrap():
    """Tasks differ in difficulty far more than the policies do: the rows' intervals overlap, the paired
    difference's interval is narrow and excludes 0, as scipy's bootstrap of the per-task differences says."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.0, 0.6, 64)
    base = {"id": difficulty + rng.normal(0, 0.01, 64), "subjects_found": rng.integers(0, 3, 64).astype(float)}
    ippo = {"id": base["id"] + 0.02 + rng.normal(0, 0.01, 64), "subjects_found": base["subjects_found"].copy()}
    base["id"][:4] = ippo["id"][:4] = np.nan  # a metric that does not apply to some tasks
    rows = {name: summarize(v, 4000, 0.95, 1) for name, v in (("base", base), ("ippo", ippo))}
    assert rows["ippo"]["id"].low < rows["base"]["id"].high  # unpaired, the gain is inside the noise
    out = paired_differences(ippo, base, 4000, 0.95, 1)
    gain = ippo["id"][4:] - base["id"][4:]
    assert out["id"].mean == pytest.approx(gain.mean()) and out["id"].mean == pytest.approx(rows["ippo"]["id"].mean - rows["base"]["id"].mean)
    reference = stats.bootstrap((gain,), np.mean, n_resamples=4000, confidence_level=0.95, method="percentile", random_state=3).confidence_interval
    width = reference.high - reference.low
    assert out["id"].low == pytest.approx(reference.low, abs=0.1 * width) and out["id"].high == pytest.approx(reference.high, abs=0.1 * width)
    assert 0 < out["id"].low < out["id"].high and out["id"].tasks == 60
    assert out["subjects_found"] == Summary(0.0, 0.0, 0.0, 64)  # the same counts: no difference, and no interval
    assert out[OVERALL].mean == pytest.approx(rows["ippo"][OVERALL].mean - rows["base"][OVERALL].mean)
    assert paired_differences(base, ippo, 4000, 0.95, 1)["id"].mean == pytest.approx(-gain.mean())  # policy minus reference


def test_table_has_table_1_layout_with_intervals_and_dashes():
    rows = {
        "base": {"clip_t": Summary(0.26, 0.25, 0.27, 4), "face_sim": Summary(float("nan"), float("nan"), float("nan"), 0), OVERALL: Summary(0.26, 0.25, 0.27, 4)},
        "ippo": {"clip_t": Summary(0.28, 0.27, 0.29, 4), "face_sim": Summary(0.5, 0.4, 0.6, 4), OVERALL: Summary(0.39, 0.3, 0.45, 4)},
    }
    lines = table_markdown(rows, ["clip_t", "face_sim"], 0.95).splitlines()
    assert lines[0] == "| Policy | CLIP-T | Face-Sim | Overall AVG |"
    assert lines[2] == "| base | 0.2600 [0.2500, 0.2700] | — | 0.2600 [0.2500, 0.2700] |"
    assert lines[3].startswith("| ippo | 0.2800 [0.2700, 0.2900] | 0.5000 [0.4000, 0.6000] |")
    assert len(lines) == 6  # no difference table without differences
    differences = {"ippo": {"clip_t": Summary(0.02, -0.005, 0.04, 4), "face_sim": Summary(float("nan"), float("nan"), float("nan"), 0),
                            OVERALL: Summary(0.02, 0.001, 0.04, 4)}}
    lines = table_markdown(rows, ["clip_t", "face_sim"], 0.95, differences, "base").splitlines()
    assert lines[7] == "| Difference from base | CLIP-T | Face-Sim | Overall AVG |"
    assert lines[9] == "| ippo - base | +0.0200 [-0.0050, +0.0400] | — | +0.0200 [+0.0010, +0.0400] |"
    assert lines[11].startswith("Paired:")
    csv = table_csv(rows, ["clip_t", "face_sim"]).splitlines()
    assert csv[0] == "policy,metric,mean,low,high,tasks" and "ippo,face_sim,0.500000,0.400000,0.600000,4" in csv
