"""Task sources: synthetic shapes and JSON Lines manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rl_align.ippo.tasks import ManifestError, ManifestTasks, SyntheticShapeTasks, TaskConfig, build_task_source


def test_synthetic_tasks_are_keyed_by_seed_iteration_group():
    source = SyntheticShapeTasks(TaskConfig(min_subjects=1, max_subjects=3, reference_size=32), seed=0)
    a = source.task(3, 1)
    assert a.prompt == source.task(3, 1).prompt
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.references, source.task(3, 1).references))
    prompts = {source.task(it, g).prompt for it in range(10) for g in range(4)}
    assert len(prompts) > 20  # groups and iterations get different tasks
    counts = {len(source.task(it, 0).references) for it in range(30)}
    assert counts == {1, 2, 3}
    for ref, category in zip(a.references, a.categories):
        assert ref.image.shape == (32, 32, 3) and ref.kind == "object" and ref.caption in a.prompt
        assert ref.caption.endswith(category)  # the shape is the category


def _write(tmp_path, lines):
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "ref.png")
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_loads_and_picks_deterministically(tmp_path):
    good = json.dumps({"prompt": "a cat and a hat", "references": [{"image": "ref.png", "kind": "object", "caption": "a hat"}]})
    path = _write(tmp_path, [good, json.dumps({"prompt": "an empty street"})])
    source = build_task_source(TaskConfig(source="manifest", manifest=str(path)), seed=1)
    assert isinstance(source, ManifestTasks) and len(source.tasks) == 2
    assert source.tasks[0].references[0].image.shape == (8, 8, 3)
    assert [source.task(i, 0).prompt for i in range(20)] == [source.task(i, 0).prompt for i in range(20)]
    assert {source.task(i, 0).prompt for i in range(20)} == {"a cat and a hat", "an empty street"}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"tasks.jsonl:2: not valid JSON"),
        ("[1, 2]", r"tasks.jsonl:2: expected a JSON object, got list"),
        (json.dumps({"prompt": "p", "refrences": []}), r"tasks.jsonl:2: unknown key 'refrences'; a task has prompt, references"),
        (json.dumps({"prompt": "p", "references": [{"image": "ref.png", "kind": "face", "captoin": "x"}]}), r"tasks.jsonl:2: references\[0\]: unknown key 'captoin'"),
        (json.dumps({"references": []}), r"tasks.jsonl:2: expected an object with a string 'prompt'"),
        (json.dumps({"prompt": "p", "references": [{"image": "missing.png", "kind": "face"}]}), r"tasks.jsonl:2: references\[0\].image: file .*missing.png does not exist"),
        (json.dumps({"prompt": "p", "references": [{"image": "ref.png", "kind": "animal"}]}), r"tasks.jsonl:2: references\[0\].kind: expected one of face, object"),
    ],
)
def test_bad_manifest_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"prompt": "fine"}), line])
    with pytest.raises(ManifestError, match=message):
        ManifestTasks(path, seed=0)


def test_a_manifest_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(json.dumps({"prompt": "fine"}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ManifestError, match=r"tasks.jsonl:2: not UTF-8 text \(byte 0 of the line\)"):
        ManifestTasks(path, seed=0)


def test_an_image_bomb_and_an_undecodable_image_name_their_line(tmp_path):
    """A reference whose header declares more pixels than PIL's bomb limit, and a file that is no image:
    each is a ManifestError naming file:line and the reference, not a warning or a bare PIL error."""
    Image.new("L", (16, 16)).save(tmp_path / "bomb.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 150  # 16 x 16 = 256 pixels: a warning for PIL (under twice the limit), refused here
        for name in ("bomb.png", "junk.png"):
            lines = [json.dumps({"prompt": "fine"})] * 2 + [json.dumps({"prompt": "p", "references": [{"image": name, "kind": "object"}]})]
            with pytest.raises(ManifestError, match=rf"tasks.jsonl:3: references\[0\].image: cannot read .*{name} as an image"):
                ManifestTasks(_write(tmp_path, lines), seed=0)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_unknown_categories_are_refused_at_start_up_naming_the_line(tmp_path):
    ref = {"image": "ref.png", "kind": "object", "caption": "a bag"}
    lines = [json.dumps({"prompt": "a bag", "references": [{**ref, "category": "bag"}]}), json.dumps({"prompt": "a hat", "references": [{**ref, "category": "hat"}]})]
    source = ManifestTasks(_write(tmp_path, lines), seed=0)
    source.check_categories(("bag", "hat"))
    with pytest.raises(ManifestError, match=r"tasks.jsonl:2: references\[0\].category 'hat' has no condition id"):
        source.check_categories(("face", "bag"))
    SyntheticShapeTasks(TaskConfig(), seed=0).check_categories(("circle", "square", "triangle", "diamond"))
    with pytest.raises(ManifestError, match="'diamond'"):
        SyntheticShapeTasks(TaskConfig(), seed=0).check_categories(("circle", "square", "triangle"))


def test_manifest_categories_are_optional_but_all_or_none(tmp_path):
    ref = {"image": "ref.png", "kind": "face", "caption": "a woman"}
    lines = [
        json.dumps({"prompt": "a woman and a bag", "references": [{**ref, "category": "face"}, {**ref, "category": "bag", "caption": "a bag"}]}),
        json.dumps({"prompt": "a woman", "references": [ref]}),
    ]
    tasks = ManifestTasks(_write(tmp_path, lines), seed=0).tasks
    assert tasks[0].categories == ("face", "bag") and tasks[1].categories is None
    mixed = json.dumps({"prompt": "p", "references": [{**ref, "category": "face"}, ref]})
    with pytest.raises(ManifestError, match="tasks.jsonl:1: give every reference a 'category' or none"):
        ManifestTasks(_write(tmp_path, [mixed]), seed=0)


def test_manifest_config_needs_a_path():
    with pytest.raises(ValueError, match="tasks.manifest is empty"):
        TaskConfig(source="manifest")
