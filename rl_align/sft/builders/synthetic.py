"""Offline synthetic multi-subject samples of coloured shapes (``rl_align.core.synthetic``), so every stage
runs with no data. Writes PNGs and a ``manifest.jsonl`` (``rl_align.sft.manifest`` format)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rl_align.core import synthetic
from rl_align.sft.builders.files import MANIFEST_NAME, save_mask, save_rgb
from rl_align.sft.manifest import SampleRecord, SubjectRecord, write_manifest

SYNTHETIC_CATEGORIES: tuple[str, ...] = synthetic.SHAPES
MIN_SYNTHETIC_MASK_FRACTION = 0.02  # a visible mask must cover at least this share of the scene
MAX_SCENE_DRAWS = 1000  # redraws of one synthetic scene before giving up on the 2% rule




def _scene_with_visible_subjects(
    subjects: Sequence[synthetic.ShapeSubject], image_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """compose_scene, drawn again with the same rng until every visible mask covers at least
    MIN_SYNTHETIC_MASK_FRACTION of the image (an almost hidden subject would teach nothing)."""
    least_pixels = MIN_SYNTHETIC_MASK_FRACTION * image_size * image_size
    for _ in range(MAX_SCENE_DRAWS):
        image, masks = synthetic.compose_scene(subjects, image_size, rng)
        if masks.sum(axis=(1, 2)).min() >= least_pixels:
            return image, masks
    raise ValueError(
        f"could not place {len(subjects)} subjects in a {image_size}x{image_size} scene with every visible mask "
        f">= {MIN_SYNTHETIC_MASK_FRACTION:.0%} of the image in {MAX_SCENE_DRAWS} draws; lower max_subjects"
    )


def build_synthetic_manifest(
    out_dir: Path, samples: int, min_subjects: int, max_subjects: int, image_size: int, reference_size: int, seed: int
) -> Path:
    """Write ``samples`` synthetic multi-subject samples into ``out_dir`` and return the manifest's path.

    Per sample: a subject count uniform in [min_subjects, max_subjects], distinct coloured shapes
    (sample_subjects), a scene (compose_scene, redrawn until every visible mask covers >= 2% of it),
    prompt = scene_prompt; each subject: category = shape, caption = subject.caption, mask = its visible
    mask, reference = render_reference at ``reference_size`` (one file per colour and shape),
    reference_mask = the reference's non-white pixels. Everything comes from default_rng(seed): the same
    seed writes byte-identical files.
    """
    out_dir = Path(out_dir)
    if samples < 1:
        raise ValueError(f"samples: expected at least 1, got {samples}")
    if not 1 <= min_subjects <= max_subjects <= len(synthetic.COLOURS):
        raise ValueError(
            f"min_subjects, max_subjects: expected 1 <= min <= max <= {len(synthetic.COLOURS)} (one colour each), "
            f"got {min_subjects}, {max_subjects}"
        )
    if image_size < 8 or reference_size < 8:
        raise ValueError(f"image_size and reference_size: expected at least 8 pixels, got {image_size}, {reference_size}")
    rng = np.random.default_rng(seed)
    records = []
    written_references: set[str] = set()
    for number in range(samples):
        subjects = synthetic.sample_subjects(rng, int(rng.integers(min_subjects, max_subjects + 1)))
        image, masks = _scene_with_visible_subjects(subjects, image_size, rng)
        target = f"targets/{number:05d}.png"
        save_rgb(image, out_dir / target)
        subject_records = []
        for k, (subject, mask) in enumerate(zip(subjects, masks)):
            stem = f"references/{subject.colour}-{subject.shape}"
            if stem not in written_references:
                reference = synthetic.render_reference(subject, reference_size)
                save_rgb(reference, out_dir / f"{stem}.png")
                save_mask((reference != 255).any(axis=-1), out_dir / f"{stem}-mask.png")
                written_references.add(stem)
            mask_path = f"masks/{number:05d}-{k}.png"
            save_mask(mask, out_dir / mask_path)
            subject_records.append(SubjectRecord(f"{stem}.png", subject.shape, subject.caption, mask_path, f"{stem}-mask.png"))
        records.append(SampleRecord(target, synthetic.scene_prompt(subjects), tuple(subject_records)))
    return write_manifest(records, out_dir / MANIFEST_NAME)
