"""Builders of warm-start manifests: MUSAR diptychs, MS-CustomNet sets from COCO annotations, synthetic scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from rl_align.sft.builders import (
    SYNTHETIC_CATEGORIES,
    another_caption,
    build_coco_manifest,
    build_diptych_manifest,
    build_synthetic_manifest,
    decode_coco_rle_string,
    diptych_prompt,
    layout_draw_order,
    segmentation_mask,
)
from rl_align.sft.manifest import SampleRecord, SubjectRecord, check_manifest, read_image, read_mask, write_manifest
from rl_align.core.synthetic import COLOURS


# ---------------------------------------------------------------------------------------------------------
# Diptych prompts


def test_another_caption_replaces_a_leading_article():
    assert another_caption("a red circle") == "another red circle"
    assert another_caption("An apple") == "another apple"
    assert another_caption("THE dog") == "another dog"
    assert another_caption("Nourishing scalp oil for healthy hair") == "another Nourishing scalp oil for healthy hair"
    assert another_caption("anteater") == "another anteater"  # "an" only counts as a separate word
    with pytest.raises(ValueError, match="caption"):
        another_caption("  ")


def test_diptych_prompt_follows_the_musar_template():
    caption = "Nourishing scalp oil for healthy hair"
    prompt, right_caption = diptych_prompt(
        f"{caption}. In an upscale city salon", f"{caption}. Placed elegantly on a stone ledge", caption
    )
    assert prompt == (
        "Two images concatenated side by side, the left part is: Nourishing scalp oil for healthy hair. In an upscale "
        "city salon, the right part is: another Nourishing scalp oil for healthy hair. Placed elegantly on a stone ledge"
    )
    assert right_caption == "another Nourishing scalp oil for healthy hair"


def test_diptych_prompt_replaces_only_the_first_case_insensitive_occurrence():
    prompt, right_caption = diptych_prompt("a cat", "On grass, A red circle next to a red circle", "a red circle")
    assert prompt.endswith("the right part is: On grass, another red circle next to a red circle")
    assert right_caption == "another red circle"


def test_diptych_prompt_prefixes_a_caption_missing_from_the_prompt():
    prompt, right_caption = diptych_prompt("a cat on a sofa", "a dog in the park", "a red circle")
    assert prompt == (
        "Two images concatenated side by side, the left part is: a cat on a sofa, "
        "the right part is: another red circle, a dog in the park"
    )
    assert right_caption == "another red circle"


# ---------------------------------------------------------------------------------------------------------
# Diptych manifests


def _single_subject_source(root: Path, categories: list[str], extra_subject_on: int | None = None) -> list[SampleRecord]:
    """Samples of varied sizes with random (so resampling shows) targets, rectangle masks and one unique
    reference each; returns them as read back by check_manifest, so they carry their line numbers."""
    rng = np.random.default_rng(11)
    sizes = [(30, 40), (48, 36), (40, 40), (25, 50), (36, 30), (44, 28)]
    records = []
    for i, category in enumerate(categories):
        height, width = sizes[i % len(sizes)]
        _save(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), root / f"t{i}.png")
        mask = np.zeros((height, width), dtype=bool)
        mask[3 + i : height - 4, 5 : width - 3 - i] = True
        _save_mask(mask, root / f"m{i}.png")
        _save(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8), root / f"refs/r{i}.png")
        _save_mask(np.ones((16, 12), dtype=bool), root / f"refs/r{i}-mask.png")
        subject = SubjectRecord(f"refs/r{i}.png", category, f"a {category}", f"m{i}.png", f"refs/r{i}-mask.png")
        subjects = (subject, subject) if i == extra_subject_on else (subject,)
        records.append(SampleRecord(f"t{i}.png", f"a {category} on a table", subjects))
    samples, problems = check_manifest(write_manifest(records, root / "manifest.jsonl"))
    assert problems == []
    return samples


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)


def _source_index(manifest_dir: Path, subject: SubjectRecord, source_root: Path) -> int:
    """Which source sample a diptych subject came from, by its (unique) reference file."""
    reference = (manifest_dir / subject.reference).resolve()
    assert reference.parent == (source_root / "refs").resolve()
    return int(reference.stem[1:])


def test_diptych_halves_line_up_with_their_sources(tmp_path):
    source_root = tmp_path / "source"
    sources = _single_subject_source(source_root, ["cat", "dog", "cat", "bird"])
    out = tmp_path / "diptych"
    manifest = build_diptych_manifest(sources, source_root, out, "random", count=12, seed=5)
    samples, problems = check_manifest(manifest, ["cat", "dog", "bird"])
    assert problems == [] and len(samples) == 12
    for sample in samples:
        left_index = _source_index(out, sample.subjects[0], source_root)
        right_index = _source_index(out, sample.subjects[1], source_root)
        assert left_index != right_index  # a diptych pairs two distinct samples
        left, right = sources[left_index], sources[right_index]
        left_target = read_image(source_root / left.target)
        height, width = left_target.shape[:2]
        right_resized = np.asarray(
            Image.open(source_root / right.target).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        )
        target = read_image(out / sample.target)
        assert target.shape == (height, 2 * width, 3)
        assert np.array_equal(target[:, :width], left_target)
        assert np.array_equal(target[:, width:], right_resized)
        left_mask, right_mask = read_mask(out / sample.subjects[0].mask), read_mask(out / sample.subjects[1].mask)
        assert np.array_equal(left_mask[:, :width], read_mask(source_root / left.subjects[0].mask))
        assert not left_mask[:, width:].any()
        source_right_mask = Image.open(source_root / right.subjects[0].mask).resize((width, height), Image.Resampling.NEAREST)
        assert np.array_equal(right_mask[:, width:], np.asarray(source_right_mask) > 0)
        assert not right_mask[:, :width].any()
        assert sample.subjects[0].caption == left.subjects[0].caption
        assert sample.subjects[1].caption == "another " + right.subjects[0].category
        assert [s.category for s in sample.subjects] == [left.subjects[0].category, right.subjects[0].category]
        assert (out / sample.subjects[1].reference_mask).resolve() == (source_root / right.subjects[0].reference_mask).resolve()
        assert sample.prompt == diptych_prompt(left.prompt, right.prompt, right.subjects[0].caption)[0]
    assert not (out / "refs").exists()  # references stay where they are


def test_diptych_is_deterministic_in_seed(tmp_path):
    source_root = tmp_path / "source"
    sources = _single_subject_source(source_root, ["cat", "dog", "cat", "bird"])
    first = build_diptych_manifest(sources, source_root, tmp_path / "a", "random", count=6, seed=2).read_text()
    again = build_diptych_manifest(sources, source_root, tmp_path / "b", "random", count=6, seed=2).read_text()
    other = build_diptych_manifest(sources, source_root, tmp_path / "c", "random", count=6, seed=3).read_text()
    assert first == again and first != other


def test_same_category_diptychs_pair_a_category_with_itself(tmp_path):
    source_root = tmp_path / "source"
    sources = _single_subject_source(source_root, ["cat", "dog", "cat", "bird", "dog"])
    out = tmp_path / "diptych"
    samples, problems = check_manifest(build_diptych_manifest(sources, source_root, out, "same_category", count=10, seed=0))
    assert problems == []
    used = set()
    for sample in samples:
        left, right = (_source_index(out, subject, source_root) for subject in sample.subjects)
        assert left != right
        assert sample.subjects[0].category == sample.subjects[1].category
        used.update((left, right))
    assert 3 not in used  # the lone bird has no partner
    with pytest.raises(ValueError, match="at least 2 samples"):
        build_diptych_manifest(sources[:2], source_root, tmp_path / "none", "same_category", count=1, seed=0)


def test_diptych_refuses_a_multi_subject_source_naming_its_line(tmp_path):
    source_root = tmp_path / "source"
    sources = _single_subject_source(source_root, ["cat", "dog", "cat"], extra_subject_on=1)
    assert sources[1].line == 2
    with pytest.raises(ValueError, match="line 2 .* has 2 subjects"):
        build_diptych_manifest(sources, source_root, tmp_path / "out", "random", count=2, seed=0)


# ---------------------------------------------------------------------------------------------------------
# COCO segmentations


def _fortran_runs(mask: np.ndarray) -> list[int]:
    """Run lengths of a mask in column-major order, starting with a (possibly empty) background run."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    return [0] + runs if flat[0] else runs


def _compressed(runs: list[int]) -> str:
    """COCO's string encoding, written from the format: 5-bit groups low first, 0x20 = more groups follow,
    the last group's 0x10 is the sign; from the fourth run on, the difference to the run two before."""
    characters = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index >= 3 else run
        while True:
            group = value & 0b11111
            value >>= 5
            finished = (value == 0 and group < 16) or (value == -1 and group >= 16)
            characters.append(chr(48 + group + (0 if finished else 32)))
            if finished:
                break
    return "".join(characters)


def test_compressed_rle_matches_a_hand_worked_string():
    # 40 -> groups 8 (+0x20) then 1: "X1"; 5 -> "5"; 3 -> "3"; 2 - 5 = -3 -> group 29 with the sign bit: "M"
    assert decode_coco_rle_string("X153M") == [40, 5, 3, 2]
    assert _compressed([40, 5, 3, 2]) == "X153M"
    with pytest.raises(ValueError, match="ends inside a value"):
        decode_coco_rle_string("X")


def test_polygon_and_both_rle_forms_give_the_same_mask():
    height, width = 40, 50
    expected = np.zeros((height, width), dtype=bool)  # an L shape and a separate block
    expected[4:30, 3:12] = True
    expected[22:30, 12:41] = True
    expected[33:38, 20:45] = True
    polygons = [[3, 4, 11, 4, 11, 22, 40, 22, 40, 29, 3, 29], [20, 33, 44, 33, 44, 37, 20, 37]]
    runs = _fortran_runs(expected)
    string = _compressed(runs)
    assert any(ord(c) - 48 >= 32 for c in string)  # some value needs several groups
    assert any(b - a < 0 for a, b in zip(runs[1:], runs[3:]))  # some stored delta is negative
    size = [height, width]
    assert np.array_equal(segmentation_mask(polygons, height, width), expected)
    assert np.array_equal(segmentation_mask({"counts": runs, "size": size}, height, width), expected)
    assert np.array_equal(segmentation_mask({"counts": string, "size": size}, height, width), expected)
    with pytest.raises(ValueError, match="size"):
        segmentation_mask({"counts": runs, "size": [width, height]}, height, width)
    with pytest.raises(ValueError, match="sum to"):
        segmentation_mask({"counts": runs[:-1], "size": size}, height, width)


def test_layout_draw_order_puts_larger_areas_first_stably():
    assert layout_draw_order([5, 10, 5, 1]) == [1, 0, 2, 3]
    assert layout_draw_order([]) == []


# ---------------------------------------------------------------------------------------------------------
# MS-CustomNet sets from COCO


def _rle(mask: np.ndarray) -> dict:
    return {"counts": _fortran_runs(mask), "size": list(mask.shape)}


def _pixels(count: int, height: int = 100, width: int = 100, column: int = 60) -> np.ndarray:
    """A mask of exactly ``count`` pixels filling columns downwards from ``column``."""
    column_major = np.zeros(height * width, dtype=bool)
    column_major[column * height : column * height + count] = True
    return column_major.reshape((height, width), order="F")


def _box(mask: np.ndarray) -> list[float]:
    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(columns[0]), float(rows[0]), float(columns[-1] + 1 - columns[0]), float(rows[-1] + 1 - rows[0])]


def _coco_file(path: Path, images: list[dict], annotations: list[dict], categories: list[str]) -> Path:
    for number, annotation in enumerate(annotations, 1):
        annotation.setdefault("id", 100 + number)
        annotation.setdefault("iscrowd", 0)
    document = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(categories)],
    }
    path.write_text(json.dumps(document))
    return path


def _filter_set(tmp_path: Path) -> tuple[Path, Path]:
    """100x100 images (beta * W * H = 150 pixels): image 1 has a dog (salient), a cat of exactly 150 pixels
    (dropped), a cat of 151 (kept) and a crowd; image 2 one salient dog and a 150-pixel cat; image 3 nothing."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name in ("one.jpg", "two.png", "three.png"):
        Image.new("RGB", (100, 100), (90, 120, 30)).save(image_dir / name)
    at_beta, above_beta = _pixels(150), _pixels(151, column=80)
    crowd = np.zeros((100, 100), dtype=bool)
    crowd[50:100, 0:50] = True
    dog = [[10, 10, 29, 10, 29, 29, 10, 29]]
    annotations = [
        {"image_id": 1, "category_id": 1, "segmentation": dog, "bbox": [10, 10, 20, 20]},
        {"image_id": 1, "category_id": 2, "segmentation": _rle(at_beta), "bbox": _box(at_beta)},
        {"image_id": 1, "category_id": 2, "segmentation": _rle(above_beta), "bbox": _box(above_beta)},
        {"image_id": 1, "category_id": 3, "segmentation": _rle(crowd), "bbox": _box(crowd), "iscrowd": 1},
        {"image_id": 2, "category_id": 1, "segmentation": dog, "bbox": [10, 10, 20, 20]},
        {"image_id": 2, "category_id": 2, "segmentation": _rle(at_beta), "bbox": _box(at_beta)},
    ]
    images = [
        {"id": 1, "file_name": "one.jpg", "width": 100, "height": 100},
        {"id": 2, "file_name": "two.png", "width": 100, "height": 100},
        {"id": 3, "file_name": "three.png", "width": 100, "height": 100},
    ]
    return _coco_file(tmp_path / "instances.json", images, annotations, ["dog", "cat", "person"]), image_dir


def test_coco_filters_follow_eq_1_and_2(tmp_path):
    annotation_file, image_dir = _filter_set(tmp_path)
    report = build_coco_manifest(annotation_file, image_dir, tmp_path / "out", beta=0.015, alpha=2, seed=0)
    assert (report.images_kept, report.images_dropped) == (1, 2)
    assert (report.instances_kept, report.instances_dropped_small, report.instances_dropped_crowd) == (3, 2, 1)
    assert report.categories == ("dog", "cat")
    samples, problems = check_manifest(report.manifest, report.categories)
    assert problems == [] and len(samples) == 1
    sample = samples[0]
    assert [s.caption for s in sample.subjects] == ["a dog", "a cat"]
    assert sample.prompt == "a photo of a dog and a cat"
    assert read_mask(report.manifest.parent / sample.subjects[1].mask).sum() == 151  # the just-above-beta cat
    assert (report.manifest.parent / sample.target).read_bytes() == (image_dir / "one.jpg").read_bytes()

    lenient = build_coco_manifest(annotation_file, image_dir, tmp_path / "lenient", alpha=1, seed=0)
    assert (lenient.images_kept, lenient.images_dropped) == (2, 1)  # image 2's single dog now suffices


def test_coco_prompt_is_the_first_caption(tmp_path):
    annotation_file, image_dir = _filter_set(tmp_path)
    captions = tmp_path / "captions.json"
    captions.write_text(
        json.dumps(
            {
                "annotations": [
                    {"id": 1, "image_id": 2, "caption": "a dog alone"},
                    {"id": 2, "image_id": 1, "caption": "A dog and a cat on the grass. "},
                    {"id": 3, "image_id": 1, "caption": "Two animals."},
                ]
            }
        )
    )
    report = build_coco_manifest(annotation_file, image_dir, tmp_path / "out", captions_file=captions)
    samples, problems = check_manifest(report.manifest)
    assert problems == [] and samples[0].prompt == "A dog and a cat on the grass."


def test_coco_errors_name_the_file_and_annotation(tmp_path):
    annotation_file, image_dir = _filter_set(tmp_path)
    (image_dir / "one.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"one\.jpg.*image id 1.*101"):
        build_coco_manifest(annotation_file, image_dir, tmp_path / "out")
    document = json.loads(annotation_file.read_text())
    document["annotations"][2]["segmentation"] = {"counts": [5, 5], "size": [100, 100]}
    annotation_file.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"instances\.json: annotation id 103 .*sum to 10"):
        build_coco_manifest(annotation_file, image_dir, tmp_path / "out")


# Category colours: every pixel of a dog is a red, of a cat a blue, of a person a green.
DOG = {1: (200, 0, 0), 2: (150, 0, 0)}
CAT = {1: (0, 0, 200), 2: (0, 0, 150)}
PERSON = (0, 160, 0)


def _layering_set(tmp_path: Path) -> tuple[Path, Path]:
    """Image 1: a 40x40 dog, a 20x20 cat and a person, apart. Image 2: a 60x60 dog box whose visible part is
    an L around a 25x25 cat in its corner: the boxes overlap, so the layout map must choose who is on top."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    one = Image.new("RGB", (80, 80), (255, 255, 255))
    draw = ImageDraw.Draw(one)
    draw.rectangle((5, 5, 44, 44), fill=DOG[1])
    draw.rectangle((50, 50, 69, 69), fill=CAT[1])
    draw.rectangle((50, 5, 74, 30), fill=PERSON)
    one.save(image_dir / "one.png")
    two = Image.new("RGB", (80, 80), (255, 255, 255))
    draw = ImageDraw.Draw(two)
    draw.rectangle((10, 10, 69, 69), fill=DOG[2])
    draw.rectangle((50, 50, 74, 74), fill=CAT[2])
    two.save(image_dir / "two.png")
    annotations = [
        {"image_id": 1, "category_id": 1, "segmentation": [[5, 5, 44, 5, 44, 44, 5, 44]], "bbox": [5, 5, 40, 40]},
        {"image_id": 1, "category_id": 2, "segmentation": [[50, 50, 69, 50, 69, 69, 50, 69]], "bbox": [50, 50, 20, 20]},
        {"image_id": 1, "category_id": 3, "segmentation": [[50, 5, 74, 5, 74, 30, 50, 30]], "bbox": [50, 5, 25, 26]},
        {"image_id": 2, "category_id": 1, "segmentation": [[10, 10, 69, 10, 69, 49, 49, 49, 49, 69, 10, 69]], "bbox": [10, 10, 60, 60]},
        {"image_id": 2, "category_id": 2, "segmentation": [[50, 50, 74, 50, 74, 74, 50, 74]], "bbox": [50, 50, 25, 25]},
    ]
    images = [
        {"id": 1, "file_name": "one.png", "width": 80, "height": 80},
        {"id": 2, "file_name": "two.png", "width": 80, "height": 80},
    ]
    return _coco_file(tmp_path / "instances.json", images, annotations, ["dog", "cat", "person"]), image_dir


def _reference_colours(root: Path, subject: SubjectRecord) -> set[tuple[int, ...]]:
    pixels, mask = read_image(root / subject.reference), read_mask(root / subject.reference_mask)
    assert (pixels[~mask] == 255).all()  # painted white outside the instance
    return {tuple(int(v) for v in colour) for colour in pixels[mask]}


def test_coco_references_come_from_their_category_pool_of_another_image(tmp_path):
    annotation_file, image_dir = _layering_set(tmp_path)
    report = build_coco_manifest(annotation_file, image_dir, tmp_path / "out", seed=4)
    root = report.manifest.parent
    samples, problems = check_manifest(report.manifest, report.categories)
    assert problems == [] and report.categories == ("dog", "cat", "person")
    by_target = {Path(s.target).stem: s for s in samples}
    one, two = by_target["1"], by_target["2"]
    assert [s.category for s in one.subjects] == ["dog", "cat", "person"]
    # another image's instance of the same category when there is one; the lone person comes from its own image
    assert [_reference_colours(root, s) for s in one.subjects] == [{DOG[2]}, {CAT[2]}, {PERSON}]
    assert [_reference_colours(root, s) for s in two.subjects] == [{DOG[1]}, {CAT[1]}]
    assert one.prompt == "a photo of a dog, a cat and a person"


def test_coco_pool_size_caps_each_category_pool(tmp_path):
    annotation_file, image_dir = _layering_set(tmp_path)
    report = build_coco_manifest(annotation_file, image_dir, tmp_path / "out", pool_size=1, seed=0)
    samples, problems = check_manifest(report.manifest, report.categories)
    assert problems == []
    for category in report.categories:
        references = {s.reference for sample in samples for s in sample.subjects if s.category == category}
        assert len(references) == 1


def test_coco_layout_map_draws_smaller_instances_on_top(tmp_path):
    annotation_file, image_dir = _layering_set(tmp_path)
    report = build_coco_manifest(annotation_file, image_dir, tmp_path / "out", seed=4)
    samples, _ = check_manifest(report.manifest)
    two = next(s for s in samples if Path(s.target).stem == "2")
    layout = read_image(report.manifest.parent / two.layout)
    assert layout.shape == (80, 80, 3)
    assert tuple(layout[60, 60]) == CAT[1]  # inside both boxes: the smaller cat's reference wins
    assert tuple(layout[20, 20]) == DOG[1]  # the dog's reference fills the rest of its box
    assert tuple(layout[5, 77]) == (0, 0, 0)  # outside every box: the black canvas
    one = next(s for s in samples if Path(s.target).stem == "1")
    layout = read_image(report.manifest.parent / one.layout)
    assert tuple(layout[10, 10]) == DOG[2]  # image 2's L-shaped dog, resized into image 1's dog box
    assert tuple(layout[42, 42]) == (0, 0, 0)  # the L's missing corner is not pasted (only the reference mask is)


# ---------------------------------------------------------------------------------------------------------
# Synthetic scenes


def _tree(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_synthetic_manifest_is_valid_and_deterministic(tmp_path):
    arguments = dict(samples=12, min_subjects=1, max_subjects=3, image_size=48, reference_size=24)
    manifest = build_synthetic_manifest(tmp_path / "a", seed=7, **arguments)
    build_synthetic_manifest(tmp_path / "b", seed=7, **arguments)
    other = build_synthetic_manifest(tmp_path / "c", seed=8, **arguments)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert manifest.read_text() != other.read_text()
    samples, problems = check_manifest(manifest, SYNTHETIC_CATEGORIES)
    assert problems == [] and len(samples) == 12
    assert {len(s.subjects) for s in samples} == {1, 2, 3}
    root = manifest.parent
    for sample in samples:
        target = read_image(root / sample.target)
        for subject in sample.subjects:
            colour, shape = subject.caption.split()[1:]
            assert subject.category == shape and subject.caption in sample.prompt
            mask = read_mask(root / subject.mask)
            assert mask.sum() >= 0.02 * 48 * 48
            assert (target[mask] == COLOURS[colour]).all()
            reference = read_image(root / subject.reference)
            assert reference.shape == (24, 24, 3)
            assert np.array_equal(read_mask(root / subject.reference_mask), (reference != 255).any(-1))



def test_crowded_synthetic_scenes_keep_every_subject_visible(tmp_path):
    """With 4-5 subjects about a quarter of raw scenes hide a subject below 2%; those are drawn again."""
    manifest = build_synthetic_manifest(
        tmp_path, samples=10, min_subjects=4, max_subjects=5, image_size=48, reference_size=16, seed=1
    )
    samples, problems = check_manifest(manifest, SYNTHETIC_CATEGORIES)
    assert problems == []
    for sample in samples:
        assert 4 <= len(sample.subjects) <= 5
        for subject in sample.subjects:
            assert read_mask(tmp_path / subject.mask).sum() >= 0.02 * 48 * 48
