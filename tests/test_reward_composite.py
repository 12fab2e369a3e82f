"""The composite reward (Eq. 9), presets and free weights from config, the typed batch's input checks
and start-up failures that name the missing path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from rewards import (
    CompositeReward,
    InputError,
    ReferenceSubject,
    RewardConfig,
    ScoreBatch,
    build_reward,
    weighted_sum,
)
from rewards.config import WeightsConfig
from rewards.identity import IdentityScorer
from rl_align.core.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "rewards"


def _images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_presets_and_free_weights():
    human = load_config(RewardConfig, None, ["preset=multi_human"]).resolved_weights()
    obj = load_config(RewardConfig, None, ["preset=multi_object"]).resolved_weights()
    assert human == {"id": 0.5, "text": 1.4, "aesthetic": 0.7}
    assert obj == {"id": 1.0, "text": 1.4, "aesthetic": 0.7}
    tuned = load_config(
        RewardConfig,
        None,
        ["preset=multi_human", "weights.text=1.0", "weights.aesthetic=0", "weights.colour_target=0.3"],
    )
    assert tuned.resolved_weights() == {"id": 0.5, "text": 1.0, "colour_target": 0.3}
    assert load_config(RewardConfig, CONFIGS / "multi_human.yaml").resolved_weights() == human
    assert load_config(RewardConfig, CONFIGS / "multi_object.yaml").resolved_weights() == obj
    with pytest.raises(ConfigError, match="weights.txt.*did you mean 'text'"):
        load_config(RewardConfig, None, ["weights.txt=1"])
    with pytest.raises(ConfigError, match="id_kinds"):
        load_config(RewardConfig, None, ["id_kinds=[face,face]"])


class _Constant:
    def __init__(self, name, values):
        self.name = name
        self.values = np.asarray(values, dtype=np.float64)

    def score(self, batch):
        return self.values[: len(batch)]


def test_weighted_sum_is_eq9():
    components = {"text": np.array([0.3, 0.1]), "aesthetic": np.array([0.2, 0.4]), "id": np.array([0.5, 0.0])}
    weights = {"id": 0.5, "text": 1.4, "aesthetic": 0.7}
    expected = [1.4 * 0.3 + 0.7 * 0.2 + 0.5 * 0.5, 1.4 * 0.1 + 0.7 * 0.4 + 0.5 * 0.0]
    np.testing.assert_allclose(weighted_sum(components, weights), expected)


def test_composite_scores_every_component_and_checks_shapes():
    batch = ScoreBatch(images=_images(2), prompts=["a", "b"])
    reward = CompositeReward([_Constant("text", [1.0, 2.0]), _Constant("id", [0.5, 0.25])], {"text": 2.0, "id": 4.0})
    result = reward.score(batch)
    np.testing.assert_allclose(result.rewards, [4.0, 5.0])
    assert set(result.components) == {"text", "id"}
    with pytest.raises(ValueError, match="mismatch"):
        CompositeReward([_Constant("text", [1.0])], {"id": 1.0})
    broken = CompositeReward([_Constant("text", [1.0])], {"text": 1.0})
    with pytest.raises(RuntimeError, match="'text' returned shape"):
        broken.score(batch)
    nan = CompositeReward([_Constant("text", [1.0, np.nan])], {"text": 1.0})
    with pytest.raises(RuntimeError, match=r"'text' returned non-finite scores for images \[1\]"):
        nan.score(batch)


def test_quickstart_config_builds_a_weight_free_reward():
    cfg = load_config(RewardConfig, CONFIGS / "quickstart.yaml")
    reward = build_reward(cfg)
    assert set(reward.weights) == {"colour_target"}
    result = reward.score(ScoreBatch(images=_images(3), prompts=["x"] * 3))
    assert result.rewards.shape == (3,) and np.all(result.rewards <= 0)
    with pytest.raises(ValueError, match="no components"):
        build_reward(RewardConfig())


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["weights.id=1", "face.backend=insightface", "face.insightface_dir=/nonexistent/buffalo_l"],
            ["/nonexistent/buffalo_l", "SCRFD", "ArcFace"],
        ),
        (
            ["weights.id=1", "face.dlib_model_dir=/nonexistent/dlib"],
            ["/nonexistent/dlib", "shape_predictor_5_face_landmarks.dat"],
        ),
        (
            ["weights.text=1", "clip.checkpoint=/nonexistent/clip.bin"],
            ["/nonexistent/clip.bin", "open_clip checkpoint", "ViT-L-14"],
        ),
        (["weights.aesthetic=1", "hps.checkpoint=/nonexistent/hps.pt"], ["/nonexistent/hps.pt", "ViT-H-14"]),
        (["weights.text=1"], ["clip.checkpoint", "no path"]),
        (
            ["weights.id=1", "id_kinds=[object]", "object.florence_dir=/nonexistent/florence"],
            ["/nonexistent/florence", "Florence-2"],
        ),
    ],
)
def test_missing_model_files_fail_at_start_up_naming_the_path(overrides, words):
    with pytest.raises(FileNotFoundError) as info:
        build_reward(load_config(RewardConfig, None, overrides))
    for word in words:
        assert word in str(info.value)


def test_batch_checks_name_the_field_and_index():
    good = _images(2)
    face = ReferenceSubject(image=good[0], kind="face", caption="")
    cases = [
        (dict(images=[good[0], good[1].astype(np.float32)], prompts=["a", "b"]), "images[1]"),
        (dict(images=[good[0], good[1][:, :, :2]], prompts=["a", "b"]), "images[1]"),
        (dict(images=good, prompts=["a"]), "prompts"),
        (dict(images=good, prompts=["a", 3]), "prompts[1]"),
        (dict(images=good, prompts=["a", "b"], references=[[face]]), "references"),
        (
            dict(images=good, prompts=["a", "b"], references=[[face], [face, ReferenceSubject(good[0], "animal")]]),
            "references[1][1].kind",
        ),
        (
            dict(
                images=good,
                prompts=["a", "b"],
                references=[[], [ReferenceSubject(np.zeros((0, 4, 3), np.uint8), "face")]],
            ),
            "references[1][0].image",
        ),
    ]
    for kwargs, where in cases:
        with pytest.raises(InputError) as info:
            ScoreBatch(**kwargs)
        assert info.value.where == where, (where, str(info.value))


class _FakeFaceEmbedder:
    """Not a face model: a deterministic embedder over the mean colour, enough to exercise the ``id``
    scorer's bookkeeping (caching, per-kind matching, normalisation by N_ref)."""

    kind = "face"

    def __init__(self):
        self.reference_calls = 0

    def embed_reference(self, subject, where):
        self.reference_calls += 1
        return subject.image.reshape(-1, 3).mean(0)

    def embed_candidates(self, image, captions):
        # Candidates: the mean colours of the left and right halves.
        w = image.shape[1] // 2
        return np.stack([image[:, :w].reshape(-1, 3).mean(0), image[:, w:].reshape(-1, 3).mean(0)])

    def similarity(self, refs, candidates):
        return 1.0 - np.abs(refs[:, None, :] - candidates[None, :, :]).mean(-1) / 255.0


def test_identity_scorer_matches_per_kind_and_caches_references():
    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    blue[..., 2] = 255
    refs = [ReferenceSubject(red, "face"), ReferenceSubject(blue, "face")]
    both = np.concatenate([red, blue], axis=1)
    twice_red = np.concatenate([red, red], axis=1)
    embedder = _FakeFaceEmbedder()
    scores = IdentityScorer([embedder]).score(
        ScoreBatch(images=[both, twice_red, both], prompts=["", "", ""], references=[refs, refs, []])
    )
    np.testing.assert_allclose(scores, [1.0, (1.0 + 1 / 3) / 2, 0.0])
    assert embedder.reference_calls == 2  # each distinct reference embedded once per batch
    with pytest.raises(InputError) as info:
        IdentityScorer([embedder]).score(
            ScoreBatch(images=[both], prompts=[""], references=[[ReferenceSubject(red, "object")]])
        )
    assert info.value.where == "references[0][0].kind"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_reward_config_parses(path):
    cfg = load_config(RewardConfig, path)
    assert cfg.resolved_weights()
    assert cfg.server.host == "127.0.0.1"  # loopback unless a user decides otherwise


def test_the_offline_face_config_builds_without_any_path():
    reward = build_reward(load_config(RewardConfig, CONFIGS / "offline_faces.yaml"))
    assert set(reward.scorers) == {"id"} and set(reward.scorers["id"].embedders) == {"face"}


class _FakeObjectEmbedder(_FakeFaceEmbedder):
    kind = "object"


def test_identity_sums_matches_over_kinds_and_divides_by_all_references():
    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    blue[..., 2] = 255
    image = np.concatenate([red, blue], axis=1)
    face_red, object_blue = ReferenceSubject(red, "face"), ReferenceSubject(blue, "object", "a blue box")
    scorer = IdentityScorer([_FakeFaceEmbedder(), _FakeObjectEmbedder()])
    # Each kind matches within itself: red face -> red half (1.0), blue object -> blue half (1.0).
    both = scorer.score(ScoreBatch([image], [""], [[face_red, object_blue]]))
    # Each kind has its own candidates (the face detector's and the grounder's), so the blue face and the
    # blue object both find their match: (1 + 1 + 1) / 3. One pool shared by all kinds would give 2 / 3.
    three = scorer.score(ScoreBatch([image], [""], [[face_red, ReferenceSubject(blue, "face"), object_blue]]))
    np.testing.assert_allclose(both, [1.0])
    np.testing.assert_allclose(three, [1.0])
    with pytest.raises(ValueError, match="one embedder per subject kind"):
        IdentityScorer([_FakeFaceEmbedder(), _FakeFaceEmbedder()])


@pytest.mark.parametrize("component", [f.name for f in dataclasses.fields(WeightsConfig)])
def test_every_weight_has_a_scorer(component):
    # Each weight field names a component the builder knows: it builds (weight-free, dlib) or asks for
    # its model path -- never "unknown component".
    cfg = load_config(RewardConfig, None, [f"weights.{component}=1"])
    try:
        reward = build_reward(cfg)
    except FileNotFoundError as exc:
        assert "no path configured" in str(exc)
    else:
        assert set(reward.scorers) == {component}
