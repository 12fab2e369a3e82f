"""CLIP text score and HPSv2 through open_clip on a tiny random-init (seeded) CLIP registered in-process,
loaded from checkpoint files written by the test, end to end."""

from __future__ import annotations


import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewards import RewardConfig, ScoreBatch, build_reward
from rewards.clip_scores import ClipTextScorer, HpsScorer, hps_preprocess
from rewards.config import ClipConfig
from rl_align.core.config import load_config
from clip_helpers import TINY, register_tiny_clip, tiny_clip

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    register_tiny_clip(folder)
    model = tiny_clip(seed=0)
    clip_path = folder / "clip.bin"
    torch.save(model.state_dict(), clip_path)
    # HPS checkpoints are {"state_dict": ...} saved from DDP training, with "module." prefixes.
    hps_model = tiny_clip(seed=1)
    hps_path = folder / "hps.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in hps_model.state_dict().items()}}, hps_path)
    return clip_path, hps_path, model, hps_model


def _batch():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(48, 40 + 8 * i, 3), dtype=np.uint8) for i in range(3)]
    return ScoreBatch(images=images, prompts=["a red apple", "two people on a beach", "a dog"])


def _reference_cosine(model, pixels: torch.Tensor, prompt: str) -> float:
    """One image, one prompt, the textbook way: cosine of the two encoder outputs."""
    with torch.no_grad():
        image_features = model.encode_image(pixels[None])
        text_features = model.encode_text(open_clip.tokenize([prompt]))
    return float(F.cosine_similarity(image_features, text_features).item())


def test_clip_score_is_the_image_text_cosine(checkpoints):
    clip_path, _, model, _ = checkpoints
    scorer = ClipTextScorer.from_config(ClipConfig(model_name=TINY, checkpoint=str(clip_path)), "cpu")
    scorer.batch_size = 2  # exercise the chunking
    batch = _batch()
    scores = scorer.score(batch)
    _, _, transform = open_clip.create_model_and_transforms(TINY, pretrained=None, load_weights=False)
    expected = [
        _reference_cosine(model, transform(Image.fromarray(im)), p) for im, p in zip(batch.images, batch.prompts)
    ]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.ptp(scores) > 1e-4  # not a constant
    swapped = scorer.score(ScoreBatch(images=batch.images, prompts=batch.prompts[::-1]))
    assert not np.allclose(swapped, scores)


def test_hps_score_loads_a_ddp_checkpoint_and_uses_hpsv2_preprocessing(checkpoints):
    _, hps_path, _, hps_model = checkpoints
    scorer = HpsScorer.from_config(ClipConfig(model_name=TINY, checkpoint=str(hps_path)), "cpu")
    for key, value in hps_model.state_dict().items():
        torch.testing.assert_close(scorer.model.state_dict()[key], value)
    batch = _batch()
    expected = [_reference_cosine(hps_model, hps_preprocess(im, 32), p) for im, p in zip(batch.images, batch.prompts)]
    np.testing.assert_allclose(scorer.score(batch), expected, atol=1e-5)


def test_hps_preprocess_resizes_the_longest_side_and_pads_with_black():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(20, 40, 3), dtype=np.uint8)  # H=20, W=40 -> 16 x 32, 8 rows padded each side
    out = hps_preprocess(image, 32)
    assert out.shape == (3, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    pixels = out * std + mean  # back to [0, 1]
    torch.testing.assert_close(pixels[:, :8], torch.zeros(3, 8, 32), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[:, 24:], torch.zeros(3, 8, 32), atol=1e-6, rtol=0)
    resized = np.asarray(Image.fromarray(image).resize((32, 16), Image.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(pixels[:, 8:24], torch.from_numpy(resized).permute(2, 0, 1), atol=1e-6, rtol=0)


def test_composite_with_text_and_aesthetic_from_config(checkpoints):
    clip_path, hps_path, _, _ = checkpoints
    cfg = load_config(
        RewardConfig,
        None,
        [
            "preset=multi_human",
            "weights.id=0",
            f"clip.model_name={TINY}",
            f"clip.checkpoint={clip_path}",
            f"hps.model_name={TINY}",
            f"hps.checkpoint={hps_path}",
        ],
    )
    reward = build_reward(cfg)
    result = reward.score(_batch())
    np.testing.assert_allclose(result.rewards, 1.4 * result.components["text"] + 0.7 * result.components["aesthetic"])
