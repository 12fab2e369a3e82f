"""Offline synthetic subjects and scenes."""

from __future__ import annotations

import numpy as np
import pytest

from rl_align.core.synthetic import COLOURS, ShapeSubject, compose_scene, render_reference, sample_subjects, scene_prompt


def test_scene_pixels_and_masks_agree():
    rng = np.random.default_rng(0)
    for _ in range(20):
        subjects = sample_subjects(rng, 3)
        image, masks = compose_scene(subjects, 64, rng)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and masks.shape == (3, 64, 64)
        assert not (masks.sum(0) > 1).any()  # each pixel belongs to at most one subject
        for subject, mask in zip(subjects, masks):
            assert (image[mask] == subject.rgb).all()  # a mask covers exactly its subject's colour
        assert (image[~masks.any(0)] == 255).all()  # everything else is background


def test_smaller_subjects_are_drawn_on_top():
    subjects = [ShapeSubject("square", "red"), ShapeSubject("square", "blue")]
    rng = np.random.default_rng(1)
    for _ in range(30):
        image, masks = compose_scene(subjects, 48, rng, min_scale=0.3, max_scale=0.9)
        areas = masks.sum(axis=(1, 2))
        small = int(np.argmin(areas))
        side = int(round(np.sqrt(areas[small])))
        assert abs(side * side - areas[small]) <= 2 * side  # the smaller square is never occluded


def test_seeded_and_distinct():
    a = sample_subjects(np.random.default_rng(3), 4)
    assert a == sample_subjects(np.random.default_rng(3), 4)
    assert len({s.colour for s in a}) == 4
    img_a, _ = compose_scene(a, 32, np.random.default_rng(5))
    img_b, _ = compose_scene(a, 32, np.random.default_rng(5))
    assert np.array_equal(img_a, img_b)


def test_reference_and_prompt():
    subject = ShapeSubject("circle", "green")
    ref = render_reference(subject, 32)
    assert ref.shape == (32, 32, 3) and (ref[16, 16] == COLOURS["green"]).all() and (ref[0, 0] == 255).all()
    assert scene_prompt([subject]) == "a green circle on a white background"
    assert scene_prompt([subject, ShapeSubject("square", "red"), ShapeSubject("diamond", "blue")]) == (
        "a green circle, a red square and a blue diamond on a white background"
    )
    with pytest.raises(ValueError, match="colour must be one of"):
        ShapeSubject("circle", "mauve")
