"""The weight-free ``shapes`` object backend of the ``id`` reward on scenes rendered by the embedded
synthetic data: locating subjects (also through noise and blur), the colour-and-shape similarity, the
Hungarian rule over its candidates, the config and the reward server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from rewards import InputError, ReferenceSubject, RewardConfig, ScoreBatch, build_reward, reward_info
from rewards.client import RewardClient
from rewards.config import ObjectConfig, ShapesConfig, WeightsConfig
from rewards.identity import IdentityScorer
from rewards.server import build_app, running_server
from rewards.shapes import ShapeSubjectEmbedder, locate_subjects
from rl_align.core.config import ConfigError, load_config
from rl_align.core.synthetic import SHAPES, ShapeSubject, compose_scene, render_reference, sample_subjects
from rl_align.eval.config import EvalConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = ShapesConfig()
SHAPES_REWARD = RewardConfig(
    preset="custom", weights=WeightsConfig(id=1.0), id_kinds=("object",), object=ObjectConfig(backend="shapes")
)
RED_CIRCLE = ShapeSubject("circle", "red")
BLUE_SQUARE = ShapeSubject("square", "blue")


def _scene(placed: list[tuple[ShapeSubject, int, int, int]], size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Subjects drawn at known places, (subject, x, y, side) each, on white: the image (size, size, 3)
    and the masks (N, size, size). Each subject fills its box: x..x+side-1, y..y+side-1."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    masks = np.zeros((len(placed), size, size), dtype=bool)
    for k, (subject, x, y, side) in enumerate(placed):
        tile = render_reference(subject, side, margin=0.0)  # (side, side, 3), the shape touches all four edges
        drawn = (tile != 255).any(-1)
        image[y : y + side, x : x + side][drawn] = tile[drawn]
        masks[k, y : y + side, x : x + side] = drawn
    return image, masks


def _perturb(image: np.ndarray, noise: float, blur: float, seed: int = 0) -> np.ndarray:
    """Gaussian blur of std ``blur`` pixels, then Gaussian pixel noise of std ``noise``/255."""
    pixels = image.astype(np.float64)
    if blur:
        pixels = ndimage.gaussian_filter(pixels, (blur, blur, 0))
    pixels += np.random.default_rng(seed).normal(0.0, noise, pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _reference(subject: ShapeSubject, size: int = 32) -> ReferenceSubject:
    return ReferenceSubject(render_reference(subject, size), "object", subject.caption)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_locates_a_subject_at_its_box_with_its_mask():
    image, masks = _scene([(RED_CIRCLE, 10, 30, 20)])
    located = locate_subjects(image, CFG)
    np.testing.assert_array_equal(located.boxes, [[10, 30, 30, 50]])  # x1, y1 exclusive
    assert located.masks.shape == (1, 64, 64)
    assert _iou(located.masks[0], masks[0]) == 1.0
    assert len(locate_subjects(np.full((64, 64, 3), 255, np.uint8), CFG).boxes) == 0


def test_two_subjects_are_two_candidates_even_touching_largest_first():
    apart, _ = _scene([(RED_CIRCLE, 4, 4, 16), (BLUE_SQUARE, 36, 30, 24)])
    np.testing.assert_array_equal(locate_subjects(apart, CFG).boxes, [[36, 30, 60, 54], [4, 4, 20, 20]])
    # Touching subjects of different colours are split by colour; two of one colour by connectivity.
    touching, masks = _scene([(BLUE_SQUARE, 10, 10, 24), (RED_CIRCLE, 34, 14, 16)])
    located = locate_subjects(touching, CFG)
    assert len(located.boxes) == 2
    assert _iou(located.masks[0], masks[0]) > 0.97 and _iou(located.masks[1], masks[1]) > 0.97
    twins, _ = _scene([(RED_CIRCLE, 4, 4, 16), (RED_CIRCLE, 40, 40, 16)])
    assert len(locate_subjects(twins, CFG).boxes) == 2


@pytest.mark.parametrize("noise, blur", [(20, 0.0), (0, 1.0), (20, 1.0)], ids=["noise", "blur", "noise+blur"])
def test_noise_and_blur_do_not_split_a_subject(noise, blur):
    placed = [(RED_CIRCLE, 6, 8, 20), (BLUE_SQUARE, 36, 34, 22), (ShapeSubject("triangle", "yellow"), 38, 4, 18)]
    clean, masks = _scene(placed)
    for seed in range(3):
        located = locate_subjects(_perturb(clean, noise, blur, seed), CFG)
        assert len(located.boxes) == 3, located.boxes
        for mask in masks:  # each subject is one candidate, with its outline (not swollen by the blur)
            assert max(_iou(mask, found) for found in located.masks) > 0.8
        # The boxes of the clean scene, in the same order (by area).
        np.testing.assert_allclose(located.boxes, locate_subjects(clean, CFG).boxes, atol=2)


def test_small_subjects_of_a_32_px_scene_survive_noise_and_blur():
    # Subjects of 9 px blurred and noisy: the median filter, merging a blurred core with its rim and
    # cutting the rim at half intensity are each needed here.
    placed = [(RED_CIRCLE, 2, 3, 9), (BLUE_SQUARE, 18, 17, 9), (ShapeSubject("diamond", "orange"), 19, 2, 9)]
    clean, masks = _scene([*placed, (ShapeSubject("triangle", "green"), 3, 19, 9)], size=32)
    for seed in range(8):
        located = locate_subjects(_perturb(clean, 20, 1.0, seed), CFG)
        assert len(located.boxes) == 4, (seed, located.boxes)
        for mask in masks:
            assert max(_iou(mask, found) for found in located.masks) > 0.7, seed


def test_the_quickstart_drops_specks_but_keeps_the_smallest_scene_subject():
    # Synthetic scenes draw sides of 1/4 to 1/2 of the image; a 4 px speck in a 32 px image (1.6%) is
    # what the tiny base scatters around its subjects, and one of a referenced colour would match.
    preset = load_config(RewardConfig, ROOT / "configs" / "rewards" / "synthetic_shapes.yaml").object.shapes
    assert load_config(EvalConfig, ROOT / "configs" / "eval" / "quickstart.yaml").metrics.object.shapes == preset
    for shape in SHAPES:
        image, masks = compose_scene([ShapeSubject(shape, "red")], 32, np.random.default_rng(0), 0.25, 0.25)
        located = locate_subjects(image, preset)
        assert len(located.boxes) == 1, shape
        assert _iou(masks[0], located.masks[0]) > 0.9, shape
    speck, _ = _scene([(BLUE_SQUARE, 3, 3, 4), (RED_CIRCLE, 14, 14, 12)], size=32)
    assert len(locate_subjects(speck, CFG).boxes) == 2
    located = locate_subjects(speck, preset)
    assert len(located.boxes) == 1 and located.boxes[0][0] >= 14


def test_similarity_weighs_colour_and_shape():
    embedder = ShapeSubjectEmbedder(CFG)
    ref = embedder.embed_reference(_reference(RED_CIRCLE), "r")
    assert embedder.similarity(ref[None], ref[None]) == pytest.approx(1.0)

    def best(subject: ShapeSubject) -> float:  # the subject drawn at another size in a scene
        candidates = embedder.embed_candidates(_scene([(subject, 20, 12, 22)])[0], [])
        return float(embedder.similarity(ref[None], candidates).max())

    exact = best(RED_CIRCLE)
    other_shape = best(ShapeSubject("triangle", "red"))
    other_colour = best(ShapeSubject("circle", "blue"))
    unrelated = best(ShapeSubject("triangle", "blue"))
    assert exact > 0.85
    assert other_shape < exact - 0.25 and other_colour < exact - 0.25
    assert other_colour < 0.2 and unrelated < 0.0  # left unmatched by max(C, 0)
    # A heavier colour weight moves the same-shape, other-colour pair further down.
    colourful = ShapeSubjectEmbedder(ShapesConfig(colour_weight=0.8, shape_weight=0.2))
    heavy = colourful.embed_reference(_reference(RED_CIRCLE), "r")
    blue_circle = colourful.embed_candidates(_scene([(ShapeSubject("circle", "blue"), 20, 12, 22)])[0], [])
    assert colourful.similarity(heavy[None], blue_circle).max() < other_colour - 0.2


def _identity_scores(scenes: list[np.ndarray], refs: list[ReferenceSubject]) -> np.ndarray:
    scorer = IdentityScorer([ShapeSubjectEmbedder(CFG)])
    return scorer.score(ScoreBatch(images=scenes, prompts=[""] * len(scenes), references=[refs] * len(scenes)))


def test_identity_counts_each_reference_once_and_a_missing_one_as_zero():
    refs = [_reference(RED_CIRCLE), _reference(BLUE_SQUARE)]
    both, _ = _scene([(RED_CIRCLE, 4, 6, 22), (BLUE_SQUARE, 36, 34, 24)])
    one, _ = _scene([(RED_CIRCLE, 4, 6, 22)])
    swapped, _ = _scene([(ShapeSubject("circle", "blue"), 4, 6, 22), (ShapeSubject("square", "red"), 36, 34, 24)])
    duplicated, _ = _scene([(RED_CIRCLE, 4, 6, 22), (RED_CIRCLE, 36, 34, 24)])
    blank = np.full((64, 64, 3), 255, np.uint8)
    s_both, s_one, s_swapped, s_duplicated, s_blank = _identity_scores([both, one, swapped, duplicated, blank], refs)
    assert s_both > 0.9
    assert s_one == pytest.approx(s_both / 2, abs=0.05)  # divided by the 2 references, not the 1 candidate
    assert s_swapped < s_both - 0.2  # right colours on the wrong shapes
    assert s_duplicated == pytest.approx(s_one, abs=0.02)  # a second red circle earns nothing from the square
    assert s_blank == 0.0
    # One red circle resembles a red square too (same colour), but it can stand for only one reference.
    (s_shared,) = _identity_scores([one], [_reference(RED_CIRCLE), _reference(ShapeSubject("square", "red"))])
    assert s_shared == pytest.approx(s_one, abs=0.02)


def test_random_synthetic_scenes_score_above_their_colour_swaps():
    rng = np.random.default_rng(7)
    scenes, swaps, refs = [], [], []
    for _ in range(12):
        subjects = sample_subjects(rng, 2)
        scenes.append(_perturb(compose_scene(subjects, 64, rng)[0], 10, 0.5))
        first, second = subjects
        swapped = [ShapeSubject(first.shape, second.colour), ShapeSubject(second.shape, first.colour)]
        swaps.append(_perturb(compose_scene(swapped, 64, rng)[0], 10, 0.5))
        refs.append([_reference(s) for s in subjects])
    scorer = IdentityScorer([ShapeSubjectEmbedder(CFG)])
    right = scorer.score(ScoreBatch(images=scenes, prompts=[""] * 12, references=refs))
    wrong = scorer.score(ScoreBatch(images=swaps, prompts=[""] * 12, references=refs))
    assert right.mean() > 0.75 and right.mean() > wrong.mean() + 0.25
    assert (right > wrong).mean() >= 0.9


def test_locate_gives_the_embedded_candidates_and_captions_are_ignored():
    embedder = ShapeSubjectEmbedder(CFG)
    image, _ = _scene([(RED_CIRCLE, 4, 4, 16), (BLUE_SQUARE, 36, 30, 24)])
    boxes = embedder.locate(image)
    candidates = embedder.embed_candidates(image, [])
    assert boxes.shape == (2, 4) and candidates.shape == (2, 3 + CFG.shape_grid**2)
    np.testing.assert_array_equal(embedder.embed_candidates(image, ["a red circle", "a blue square"]), candidates)
    for box, candidate in zip(boxes, candidates):  # each box's crop, alone on white, is that candidate
        x0, y0, x1, y1 = box
        alone = np.full_like(image, 255)
        alone[y0:y1, x0:x1] = image[y0:y1, x0:x1]
        np.testing.assert_allclose(embedder.embed_candidates(alone, [])[0], candidate)
    assert embedder.embed_candidates(np.full((32, 32, 3), 255, np.uint8), []).shape == (0, 3 + CFG.shape_grid**2)


def test_a_reference_showing_nothing_is_an_input_error():
    blank = ReferenceSubject(np.full((32, 32, 3), 255, np.uint8), "object", "a red circle")
    with pytest.raises(InputError) as info:
        _identity_scores([np.full((32, 32, 3), 255, np.uint8)], [_reference(RED_CIRCLE), blank])
    assert info.value.where == "references[0][1].image"


def test_build_reward_with_the_shapes_backend():
    reward = build_reward(SHAPES_REWARD)
    refs = [_reference(RED_CIRCLE), _reference(BLUE_SQUARE)]
    both, _ = _scene([(RED_CIRCLE, 4, 6, 22), (BLUE_SQUARE, 36, 34, 24)])
    batch = ScoreBatch(images=[both, both[:, ::-1].copy()], prompts=["", ""], references=[refs, refs[:1]])
    result = reward.score(batch)
    np.testing.assert_allclose(result.rewards, result.components["id"])
    np.testing.assert_allclose(result.components["id"], IdentityScorer([ShapeSubjectEmbedder(CFG)]).score(batch))
    assert result.rewards[0] > 0.9 and result.rewards[1] > 0.9  # mirrored: circle and square look the same
    assert reward_info(SHAPES_REWARD)["backends"]["id"]["object_backend"] == "shapes"
    overrides = ["weights.id=1", "id_kinds=[object]", "object.backend=shapes"]
    tuned = load_config(RewardConfig, None, [*overrides, "object.shapes.colour_weight=0.7", "object.shapes.shape_weight=0.3"])
    assert tuned.object.shapes.colour_weight == 0.7


def test_the_shapes_reward_imports_no_torch():
    probe = """
import sys
import numpy as np
from rewards import RewardConfig, ScoreBatch, build_reward
from rewards.config import ObjectConfig, WeightsConfig
cfg = RewardConfig(weights=WeightsConfig(id=1.0), id_kinds=("object",), object=ObjectConfig(backend="shapes"))
build_reward(cfg).score(ScoreBatch(images=[np.full((16, 16, 3), 255, np.uint8)], prompts=[""]))
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(colour_weight=-0.5, shape_weight=1.5), "colour_weight must be >= 0"),
        (dict(colour_weight=0.7), r"colour_weight \+ shape_weight must be 1"),
        (dict(min_area_fraction=0.0), "min_area_fraction"),
        (dict(foreground_threshold=2.0), "foreground_threshold"),
        (dict(colour_radius=0.0), "colour_radius"),
        (dict(shape_floor=1.0), "shape_floor"),
        (dict(shape_grid=1), "shape_grid"),
        (dict(median_size=0), "median_size"),
        (dict(colour_scale=0.0), "colour_scale"),
        (dict(noise_threshold=-1.0), "noise_threshold"),
    ],
)
def test_bad_shapes_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShapesConfig(**kwargs)


def test_bad_object_backend_names_the_field():
    with pytest.raises(ValueError, match="backend must be grounding or shapes"):
        ObjectConfig(backend="dinov3")
    with pytest.raises(ConfigError, match="object.backend"):
        load_config(RewardConfig, None, ["object.backend=dinov3"])
    with pytest.raises(ConfigError, match=r"object.shapes .*: min_area_fraction must be in"):
        load_config(RewardConfig, None, ["object.shapes.min_area_fraction=2"])


def test_the_reward_server_scores_with_the_shapes_backend():
    refs = [_reference(RED_CIRCLE), _reference(BLUE_SQUARE)]
    both, _ = _scene([(RED_CIRCLE, 4, 6, 22), (BLUE_SQUARE, 36, 34, 24)])
    one, _ = _scene([(BLUE_SQUARE, 36, 34, 24)])
    batch = ScoreBatch(images=[both, one], prompts=["", ""], references=[refs, refs])
    with running_server(build_app(SHAPES_REWARD, {})) as url, RewardClient(url) as client:
        result = client.score(batch)  # PNG is lossless: the server sees the same pixels
        np.testing.assert_allclose(result.rewards, build_reward(SHAPES_REWARD).score(batch).rewards, rtol=1e-12)
        assert result.rewards[0] > 0.9 and result.rewards[1] == pytest.approx(result.rewards[0] / 2, abs=0.05)
        assert client.info()["backends"]["id"]["object_backend"] == "shapes"


def test_subject_count_scores_the_named_number_of_subjects():
    from rewards.shapes import SubjectCountScorer

    one, _ = _scene([(RED_CIRCLE, 8, 8, 20)])
    two, _ = _scene([(RED_CIRCLE, 8, 8, 20), (BLUE_SQUARE, 36, 36, 20)])
    three, _ = _scene([(RED_CIRCLE, 4, 4, 16), (BLUE_SQUARE, 40, 40, 16), (ShapeSubject("diamond", "green"), 40, 4, 16)])
    blank = np.full((64, 64, 3), 255, np.uint8)
    refs = [_reference(RED_CIRCLE), _reference(BLUE_SQUARE)]
    scores = SubjectCountScorer(CFG).score(ScoreBatch([two, one, three, blank, one], ["p"] * 5, [refs, refs, refs, refs, refs[:1]]))
    # 1 - |K - N| / N: exact for 2 of 2, one missing or one extra cost 1/2, none found costs all, 1 of 1
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.5, 0.0, 1.0])


def test_background_scores_how_clean_the_named_background_is():
    from rewards.shapes import BackgroundScorer

    clean, _ = _scene([(RED_CIRCLE, 8, 8, 20), (BLUE_SQUARE, 36, 36, 20)])
    speckled = clean.copy()
    speckled[::4, ::4] = (128, 128, 128)  # grey specks too small to be subjects
    grey = np.full((64, 64, 3), 200, np.uint8)
    scores = BackgroundScorer(CFG).score(ScoreBatch([clean, speckled, grey], ["p"] * 3))
    assert scores[0] == pytest.approx(1.0, abs=1e-9)  # the subjects themselves do not count against it
    assert 0.5 < scores[1] < 0.99 and scores[2] < scores[1]
    grey_pixel = np.linalg.norm(np.full(3, 55 / 255))
    assert scores[2] == pytest.approx(max(0.0, 1 - grey_pixel / CFG.foreground_threshold), abs=1e-9)
    black_named = BackgroundScorer(ShapesConfig(background_rgb=(0.0, 0.0, 0.0))).score(ScoreBatch([clean], ["p"]))
    assert black_named[0] == 0.0  # white is as far from a named black background as a subject


def test_the_synthetic_shapes_preset_logs_each_component():
    cfg = load_config(RewardConfig, ROOT / "configs" / "rewards" / "synthetic_shapes.yaml")
    reward = build_reward(cfg)
    scene, _ = _scene([(RED_CIRCLE, 8, 8, 20), (BLUE_SQUARE, 36, 36, 20)])
    result = reward.score(ScoreBatch([scene], ["p"], [[_reference(RED_CIRCLE), _reference(BLUE_SQUARE)]]))
    assert set(result.components) == {"id", "subject_count", "background"}
    expected = result.components["id"] + 0.2 * result.components["subject_count"] + 0.2 * result.components["background"]
    np.testing.assert_allclose(result.rewards, expected)
    assert result.components["id"][0] > 0.9 and result.components["subject_count"][0] == 1.0
