"""The SFT manifest validator names every bad line and why; training refuses a manifest that fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rl_align.sft.manifest import ManifestError, check_manifest, load_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import sft as sft_script  # noqa: E402

CATEGORIES = ("dog", "cat")


def _image(path: Path, size: tuple[int, int], mask_box: tuple[int, int, int, int] | None = None) -> str:
    """An RGB image (or, with mask_box, a mask with that box set) of size (width, height)."""
    width, height = size
    if mask_box is None:
        pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    else:
        mask = np.zeros((height, width), dtype=np.uint8)
        x0, y0, x1, y1 = mask_box
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(path)
    return path.name


@pytest.fixture()
def manifest(tmp_path):
    """A manifest whose line i shows one kind of problem (line 1 is good)."""
    _image(tmp_path / "target.png", (32, 32))
    _image(tmp_path / "ref.png", (16, 16))
    _image(tmp_path / "mask.png", (32, 32), (4, 4, 20, 20))
    _image(tmp_path / "mask_small.png", (16, 16), (2, 2, 8, 8))
    _image(tmp_path / "empty.png", (32, 32), (0, 0, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    subject = {"reference": "ref.png", "category": "dog", "caption": "a dog", "mask": "mask.png"}
    good = {"target": "target.png", "prompt": "a dog on grass", "subjects": [subject]}
    lines = [
        good,  # 1
        {**good, "target": "missing.png"},  # 2: missing target file
        {**good, "subjects": [{**subject, "mask": "mask_small.png"}]},  # 3: mask size mismatch
        {**good, "subjects": [{**subject, "category": "horse"}]},  # 4: unknown category
        {**good, "subjects": [{**subject, "mask": "empty.png"}]},  # 5: empty mask
        {**good, "subjects": [{**subject, "reference_mask": "mask.png"}]},  # 6: reference mask size mismatch
        {**good, "subjects": []},  # 7: no subjects
        {**good, "prompt": ""},  # 8: empty prompt
        {**good, "subject": []},  # 9: unknown key (typo)
        {**good, "subjects": [{**subject, "reference": "broken.png"}]},  # 10: unreadable image
        {**good, "subjects": [{k: v for k, v in subject.items() if k != "caption"}]},  # 11: missing caption
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n\n"  # 12: invalid JSON, then a blank line
    path = tmp_path / "manifest.jsonl"
    path.write_text(text)
    return path


EXPECTED = {
    2: "target: missing file",
    3: "mask size 16x16 does not match the target size 32x32",
    4: "unknown category 'horse'; expected one of dog, cat",
    5: "is empty",
    6: "mask size 32x32 does not match the reference size 16x16",
    7: "subjects: expected a non-empty list",
    8: "prompt: expected a non-empty string",
    9: "unknown key(s) ['subject']",
    10: "subjects[0].reference: cannot read",
    11: "subjects[0].caption: expected a non-empty string",
    12: "not valid JSON",
}


def test_check_manifest_names_each_bad_line(manifest):
    samples, problems = check_manifest(manifest, CATEGORIES)
    assert [s.line for s in samples] == [1]
    assert [p.line for p in problems] == sorted(EXPECTED)
    for problem in problems:
        assert EXPECTED[problem.line] in problem.reason, (problem.line, problem.reason)
    # without a category list every category is allowed
    assert 4 not in {p.line for p in check_manifest(manifest)[1]}


def test_training_refuses_a_manifest_with_bad_lines(manifest):
    with pytest.raises(ManifestError) as error:
        load_manifest(manifest, CATEGORIES)
    message = str(error.value)
    assert "11 bad line(s)" in message and f"{manifest}:3:" in message and "sft.py validate" in message
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(manifest.parent / "nope.jsonl")


def test_validate_command_prints_every_bad_line(manifest, capsys):
    assert sft_script.main(["validate", str(manifest), "--categories", ",".join(CATEGORIES)]) == 1
    out = capsys.readouterr()
    printed = [line for line in out.out.splitlines() if line]
    assert len(printed) == len(EXPECTED)
    for line, reason in EXPECTED.items():
        assert any(p.startswith(f"{manifest}:{line}: ") and reason in p for p in printed), line
    assert "1 good sample(s), 11 bad line(s)" in out.err


def test_validate_command_passes_a_good_manifest(manifest, capsys):
    good = manifest.parent / "good.jsonl"
    good.write_text(manifest.read_text().splitlines()[0] + "\n")
    assert sft_script.main(["validate", str(good), "--categories", "dog,cat"]) == 0
    assert "1 good sample(s), 0 bad line(s)" in capsys.readouterr().err


def test_idar_refuses_a_face_subject_without_reference_mask(tmp_path):
    """MultiCrafter's human reference is the face crop: stage idar names the line of a "face" subject that
    has no reference_mask to crop with (it used to be used whole, silently); other stages and other
    categories pass, and a face with its reference_mask passes."""
    import dataclasses

    from policies import FluxPolicy
    from rl_align.sft.config import SFTConfig
    from rl_align.sft.data import SFTDataConfig
    from rl_align.sft.objective import StageObjective

    target, reference = _image(tmp_path / "target.png", (32, 32)), _image(tmp_path / "ref.png", (16, 16))
    mask = _image(tmp_path / "mask.png", (32, 32), (0, 0, 16, 16))
    reference_mask = _image(tmp_path / "ref-mask.png", (16, 16), (4, 4, 12, 12))

    def subject(category: str, with_reference_mask: bool) -> dict:
        entry = {"reference": reference, "category": category, "caption": category, "mask": mask}
        return entry | ({"reference_mask": reference_mask} if with_reference_mask else {})

    lines = [
        {"target": target, "prompt": "a dog", "subjects": [subject("dog", False)]},
        {"target": target, "prompt": "a face and a dog", "subjects": [subject("dog", False), subject("face", False)]},
        {"target": target, "prompt": "a face", "subjects": [subject("face", True)]},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples = load_manifest(tmp_path / "m.jsonl")
    data = SFTDataConfig(categories=(), target_size=32, reference_size=16, crop_reference_categories=("face",))
    base = SFTConfig(data=data)
    policy = FluxPolicy.from_config(base.policy)
    [problem] = StageObjective(policy, dataclasses.replace(base, stage="idar")).check_samples(samples)
    assert problem.line == 2 and "subject 1 ('face') has no reference_mask" in problem.reason
    assert StageObjective(policy, dataclasses.replace(base, stage="single")).check_samples(samples) == []
    no_crop = dataclasses.replace(base, stage="idar", data=dataclasses.replace(data, crop_reference_categories=()))
    assert StageObjective(policy, no_crop).check_samples(samples) == []
