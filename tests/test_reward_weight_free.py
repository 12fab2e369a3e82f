"""Weight-free rewards: JPEG (in)compressibility and the colour target."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rewards import ScoreBatch
from rewards.config import ColourTargetConfig, JpegConfig
from rewards.weight_free import (
    ColourTargetScorer,
    JpegSizeScorer,
    colour_distance,
    jpeg_size_kb,
)


def _batch(images):
    return ScoreBatch(images=images, prompts=[""] * len(images))


def test_jpeg_size_is_the_encoded_size_and_orders_smooth_below_noise():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png(noise))).save(buffer, format="JPEG", quality=95)
    assert jpeg_size_kb(noise, 95) == pytest.approx(len(buffer.getvalue()) / 1000)
    assert jpeg_size_kb(flat, 95) < 0.25 * jpeg_size_kb(noise, 95)
    assert jpeg_size_kb(noise, 50) < jpeg_size_kb(noise, 95)

    compress = JpegSizeScorer("jpeg_compressibility", -1.0, JpegConfig()).score(_batch([noise, flat]))
    incompress = JpegSizeScorer("jpeg_incompressibility", 1.0, JpegConfig()).score(_batch([noise, flat]))
    assert compress[1] > compress[0]  # the flat image is the more compressible one
    np.testing.assert_allclose(incompress, -compress)


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_colour_distance_matches_a_per_pixel_loop():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    target = np.array([0.9, 0.4, 0.1])
    expected = np.mean([abs(image[h, w, c] / 255.0 - target[c]) for h in range(5) for w in range(7) for c in range(3)])
    assert colour_distance(image, target) == pytest.approx(expected, rel=1e-6)


def test_colour_target_rises_monotonically_towards_the_target():
    cfg = ColourTargetConfig(rgb=(0.9, 0.4, 0.1))
    rng = np.random.default_rng(2)
    start = rng.integers(0, 256, size=(32, 32, 3)).astype(np.float64)
    goal = np.array(cfg.rgb) * 255.0
    # Blend every pixel towards the target colour: the reward a policy sees must improve at every step.
    images = [np.round((1 - a) * start + a * goal).astype(np.uint8) for a in np.linspace(0.0, 1.0, 6)]
    scores = ColourTargetScorer(cfg).score(_batch(images))
    assert np.all(np.diff(scores) > 0)
    assert scores[-1] == pytest.approx(0.0, abs=1 / 255)
    assert scores[0] < -0.2
    black = ColourTargetScorer(cfg).score(_batch([np.zeros((4, 4, 3), np.uint8)]))
    assert black[0] == pytest.approx(-np.mean(cfg.rgb))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="rgb must be three values"):
        ColourTargetConfig(rgb=(0.5, 2.0, 0.0))
    with pytest.raises(ValueError, match="quality"):
        JpegConfig(quality=0)


def test_a_group_relative_policy_gradient_learns_the_colour_target():
    # The signal a policy sees: a Gaussian policy over an image's colour (logits mu, 3 numbers), groups of
    # 16 samples, advantages (R - mean) / std as in GRPO/GSPO, REINFORCE on mu. The reward must rise.
    rng = np.random.default_rng(0)
    scorer = ColourTargetScorer(ColourTargetConfig(rgb=(0.9, 0.4, 0.1)))
    texture = rng.normal(0.0, 0.05, size=(8, 8, 3))  # fixed per-pixel variation around the colour
    mu, sigma, lr = np.zeros(3), 0.5, 0.2
    mean_rewards = []
    for _ in range(60):
        logits = mu + sigma * rng.normal(size=(16, 3))  # (G, 3)
        pixels = 1 / (1 + np.exp(-(logits[:, None, None, :] + texture)))  # (G, 8, 8, 3) in (0, 1)
        rewards = scorer.score(_batch(list(np.round(pixels * 255).astype(np.uint8))))
        advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        mu = mu + lr * np.mean(advantages[:, None] * (logits - mu) / sigma**2, axis=0)
        mean_rewards.append(rewards.mean())
    assert mean_rewards[0] < -0.2
    assert np.mean(mean_rewards[-5:]) > mean_rewards[0] + 0.15
    assert np.mean(mean_rewards[-5:]) > -0.08
