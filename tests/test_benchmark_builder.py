"""The benchmark / task-manifest builder (rl_align/eval/benchmark.py, scripts/build_benchmark.py) on real
files: face crops of scikit-image's astronaut and insightface's group photo ``t1``, small generated object
PNGs; its output read back with the RL trainer's ManifestTasks."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rl_align.core.errors import ConfigError, ManifestError
from rl_align.eval.benchmark import (
    FACE_TEMPLATES,
    BenchmarkSettings,
    VlmSceneDescriber,
    accept_scene_sentence,
    build_benchmark,
    caption_spans,
    template_prompt,
)
from rl_align.ippo.tasks import ManifestTasks

ROOT = Path(__file__).resolve().parents[1]
# Face boxes (x0, y0, x1, y1) found once by rewards.faces.DlibFaceEmbedder in the two photos.
GROUP_FACES = [(1118, 283, 1226, 390), (67, 283, 175, 390), (724, 367, 832, 474), (450, 295, 557, 402), (870, 67, 999, 196), (275, 176, 364, 265)]
ASTRONAUT_FACE = (175, 76, 265, 166)
FACE_CAPTIONS = {"face-0.png": "an astronaut", "face-3.png": "a smiling man"}  # the other five are "a person"


def _crop(image: np.ndarray, box: tuple[int, int, int, int], margin: int = 20) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin]


@pytest.fixture(scope="module")
def face_crops() -> list[np.ndarray]:
    import insightface.data
    import skimage.data

    group = np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1])  # BGR -> RGB
    return [_crop(skimage.data.astronaut(), ASTRONAUT_FACE)] + [_crop(group, box) for box in GROUP_FACES]


@pytest.fixture
def face_dir(tmp_path, face_crops) -> Path:
    """Seven identities, two of them captioned in captions.jsonl, plus a file the builder must ignore."""
    folder = tmp_path / "faces"
    folder.mkdir()
    for k, crop in enumerate(face_crops):
        Image.fromarray(crop).save(folder / f"face-{k}.png")
    (folder / "captions.jsonl").write_text("".join(json.dumps({"image": n, "caption": c}) + "\n" for n, c in FACE_CAPTIONS.items()))
    (folder / "notes.md").write_text("not an image")
    return folder


def _object_dir(parent: Path, count: int = 4) -> Path:
    folder = parent / "objects"
    folder.mkdir()
    for k in range(count):
        pixels = np.zeros((24, 32, 3), dtype=np.uint8)
        pixels[4:20, 6 + 4 * k : 22 + 4 * k] = (60 * k, 255 - 50 * k, 120)
        Image.fromarray(pixels).save(folder / f"item-{k}.jpg" if k % 2 else folder / f"item-{k}.png")
    return folder


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pair(record: dict) -> frozenset[str]:
    return frozenset(Path(ref["image"]).name for ref in record["references"])


def _assert_captions_locate_their_words(record: dict) -> None:
    """Every caption is verbatim in the prompt and the first occurrences (the policy's item spans) are disjoint."""
    captions = [ref["caption"] for ref in record["references"]]
    for caption in captions:
        assert caption in record["prompt"], (caption, record["prompt"])
    (a0, a1), (b0, b1) = caption_spans(record["prompt"], captions)
    assert a1 <= b0 or b1 <= a0, record


def test_faces_benchmark_is_a_loadable_manifest_of_all_distinct_pairs(tmp_path, face_dir):
    report = build_benchmark(face_dir, tmp_path / "bench", BenchmarkSettings("face", test_size=5, seed=0))
    out = tmp_path / "bench"
    assert (report.train, report.test, report.fallbacks) == (16, 5, 0)
    train, test = _lines(out / "train.jsonl"), _lines(out / "test.jsonl")
    assert (len(train), len(test)) == (16, 5)
    names = sorted(p.name for p in face_dir.glob("*.png"))
    written = [_pair(r) for r in train + test]
    assert all(len(pair) == 2 for pair in written)  # two distinct identities in every task
    assert sorted(map(sorted, written)) == [list(p) for p in itertools.combinations(names, 2)]  # each pair once
    assert not {_pair(r) for r in train} & {_pair(r) for r in test}
    assert sorted(p.name for p in (out / "references").iterdir()) == names

    for split, records in (("train", train), ("test", test)):
        tasks = ManifestTasks(out / f"{split}.jsonl", seed=0)
        assert len(tasks.tasks) == len(records)
        for record, task in zip(records, tasks.tasks):
            _assert_captions_locate_their_words(record)
            assert task.prompt == record["prompt"] and task.categories is None
            for ref, subject in zip(record["references"], task.references):
                source = np.asarray(Image.open(face_dir / Path(ref["image"]).name).convert("RGB"))
                assert subject.kind == "face" and np.array_equal(subject.image, source)
                expected = FACE_CAPTIONS.get(Path(ref["image"]).name, "a person")
                assert subject.caption in (expected, "another person" if expected == "a person" else expected)
            if all(Path(ref["image"]).name not in FACE_CAPTIONS for ref in record["references"]):
                assert sorted(s.caption for s in task.references) == ["a person", "another person"]

    report_json = json.loads((out / "benchmark.json").read_text())
    assert report_json["kind"] == "face" and report_json["source"] == str(face_dir.resolve()) and report_json["seed"] == 0
    assert report_json["images"] == 7 and report_json["captions"] == {"captions.jsonl": 2, "sidecar": 0, "default": 5}
    assert report_json["pairs"] == {"possible": 21, "asked": None, "written": 21}
    assert report_json["split"] == {"test_size": 5, "train": 16, "test": 5}
    assert report_json["prompts"]["source"] == "templates" and report_json["prompts"]["templates"] == list(FACE_TEMPLATES)


@pytest.mark.parametrize("pairs,test_size,expected_test", [(10, 0.25, 3), (10, 0.1, 1), (7, 7, 7), (21, 0, 0)])
def test_sampled_pairs_and_split_sizes(tmp_path, face_dir, pairs, test_size, expected_test):
    report = build_benchmark(face_dir, tmp_path / "bench", BenchmarkSettings("face", pairs=pairs, test_size=test_size, seed=3))
    train, test = _lines(tmp_path / "bench" / "train.jsonl"), _lines(tmp_path / "bench" / "test.jsonl")
    assert (report.train, report.test) == (len(train), len(test)) == (pairs - expected_test, expected_test)
    written = [_pair(r) for r in train + test]
    assert len(set(written)) == pairs and all(len(pair) == 2 for pair in written)
    used = set().union(*written)
    assert {p.name for p in (tmp_path / "bench" / "references").iterdir()} == used  # only referenced images are copied


def test_sampled_pairs_are_a_seeded_subset(tmp_path, face_dir):
    def pairs_of(seed: int, name: str) -> set:
        build_benchmark(face_dir, tmp_path / name, BenchmarkSettings("face", pairs=6, test_size=2, seed=seed))
        return {_pair(r) for split in ("train", "test") for r in _lines(tmp_path / name / f"{split}.jsonl")}

    assert pairs_of(0, "a") == pairs_of(0, "b") != pairs_of(1, "c")


def test_same_seed_gives_byte_identical_folders_and_another_seed_differs(tmp_path, face_dir):
    def files(name: str, seed: int) -> dict[str, bytes]:
        build_benchmark(face_dir, tmp_path / name, BenchmarkSettings("face", test_size=0.2, seed=seed))
        return {p.relative_to(tmp_path / name).as_posix(): p.read_bytes() for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}

    first, again, other = files("a", 7), files("b", 7), files("c", 8)
    assert first == again
    assert set(first) == set(other) and first["references/face-2.png"] == other["references/face-2.png"]
    assert first["train.jsonl"] != other["train.jsonl"] and first["test.jsonl"] != other["test.jsonl"]


def test_object_captions_and_categories_from_captions_jsonl(tmp_path):
    folder = _object_dir(tmp_path)
    entries = [("item-0.png", "a red cup", "cup"), ("item-1.jpg", "a green backpack", "bag"), ("item-2.png", "a wooden chair", "chair"),
               ("item-3.jpg", "a red cup with a handle", "cup")]
    (folder / "captions.jsonl").write_text("".join(json.dumps({"image": n, "caption": c, "category": k}) + "\n" for n, c, k in entries))
    (folder / "item-2.txt").write_text("ignored: captions.jsonl comes first")
    build_benchmark(folder, tmp_path / "bench", BenchmarkSettings("object", test_size=2))
    by_name = {n: (c, k) for n, c, k in entries}
    records = _lines(tmp_path / "bench" / "train.jsonl") + _lines(tmp_path / "bench" / "test.jsonl")
    assert len(records) == 6
    for record in records:
        _assert_captions_locate_their_words(record)  # "a red cup" inside "a red cup with a handle" included
        for ref in record["references"]:
            assert ref["kind"] == "object" and (ref["caption"], ref["category"]) == by_name[Path(ref["image"]).name]
    tasks = ManifestTasks(tmp_path / "bench" / "train.jsonl", seed=0).tasks + ManifestTasks(tmp_path / "bench" / "test.jsonl", seed=0).tasks
    for record, task in zip(records, tasks):
        assert task.categories == tuple(ref["category"] for ref in record["references"])
        assert all(s.kind == "object" for s in task.references)


def test_object_captions_from_sidecar_files(tmp_path):
    folder = _object_dir(tmp_path, count=3)
    (folder / "captions.jsonl").write_text(json.dumps({"image": "item-0.png", "caption": "a blue vase"}) + "\n")
    (folder / "item-1.txt").write_text("  a striped umbrella\n")
    (folder / "item-2.txt").write_text("a blue vase")  # the same caption as item-0: becomes "another blue vase" in a pair with it
    build_benchmark(folder, tmp_path / "bench", BenchmarkSettings("object", test_size=1))
    records = _lines(tmp_path / "bench" / "train.jsonl") + _lines(tmp_path / "bench" / "test.jsonl")
    captions = {_pair(r): {Path(ref["image"]).name: ref["caption"] for ref in r["references"]} for r in records}
    assert captions[frozenset({"item-0.png", "item-1.jpg"})] == {"item-0.png": "a blue vase", "item-1.jpg": "a striped umbrella"}
    assert captions[frozenset({"item-0.png", "item-2.png"})] == {"item-0.png": "a blue vase", "item-2.png": "another blue vase"}
    assert all("category" not in ref for r in records for ref in r["references"])
    for record in records:
        _assert_captions_locate_their_words(record)
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["captions"] == {"captions.jsonl": 1, "sidecar": 2, "default": 0}


def test_template_captions_land_on_their_own_words():
    # a caption inside the other one must come first, or its first occurrence is inside the other
    expected = ("a dog and a dog with a red collar having coffee at a street cafe", (1, 0))
    assert template_prompt(FACE_TEMPLATES, 0, ("a dog with a red collar", "a dog")) == expected
    # "{1} handing a gift to {0} ...": the caption "a gift" must not come after the template's own "a gift"
    assert template_prompt(FACE_TEMPLATES, 10, ("a gift", "a woman")) == ("a gift handing a gift to a woman in a living room", (1, 0))
    assert template_prompt(FACE_TEMPLATES, 10, ("a man", "a woman")) == ("a woman handing a gift to a man in a living room", (0, 1))
    with pytest.raises(ManifestError, match="captions 'a cafe' and 'a dog': no template places both"):
        template_prompt(("at a cafe: {0} and {1}",), 0, ("a cafe", "a dog"))


def _write_captions(folder: Path, *records: dict) -> None:
    (folder / "captions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


BAD_CAPTIONS = {
    "missing caption": (lambda d: (d / "item-1.txt").unlink(), "object image .*item-1.jpg has no caption"),
    "unknown image": (lambda d: _write_captions(d, {"image": "item-9.png", "caption": "a cup"}), "captions.jsonl:1: image 'item-9.png' is not an image"),
    "empty caption": (lambda d: _write_captions(d, {"image": "item-0.png", "caption": " "}), "captions.jsonl:1: caption of 'item-0.png'"),
    "twice": (
        lambda d: _write_captions(d, {"image": "item-0.png", "caption": "a"}, {"image": "item-0.png", "caption": "b"}), "captions.jsonl:2: .* second time"
    ),
    "bad json": (lambda d: (d / "captions.jsonl").write_text("{oops\n"), "captions.jsonl:1: not valid JSON"),
    "empty sidecar": (lambda d: (d / "item-0.txt").write_text("  \n"), "caption file .*item-0.txt is empty"),
}


@pytest.mark.parametrize("case", list(BAD_CAPTIONS))
def test_bad_object_captions_name_the_file(tmp_path, case):
    folder = _object_dir(tmp_path)
    for image in sorted(folder.iterdir()):
        image.with_suffix(".txt").write_text(f"object {image.stem}")
    spoil, message = BAD_CAPTIONS[case]
    spoil(folder)
    with pytest.raises(ManifestError, match=message):
        build_benchmark(folder, tmp_path / "bench", BenchmarkSettings("object"))
    assert not (tmp_path / "bench").exists()  # nothing written on bad input


def test_categories_on_some_images_only_are_refused(tmp_path):
    folder = _object_dir(tmp_path, count=2)
    (folder / "captions.jsonl").write_text(json.dumps({"image": "item-0.png", "caption": "a cup", "category": "cup"}) + "\n")
    (folder / "item-1.txt").write_text("a bag")
    with pytest.raises(ManifestError, match="item-1.jpg has no 'category'"):
        build_benchmark(folder, tmp_path / "bench", BenchmarkSettings("object"))


def test_bad_folders_and_settings_are_refused(tmp_path, face_dir):
    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(single / "only.png")
    with pytest.raises(ManifestError, match=f"image folder {single}: found 1 image"):
        build_benchmark(single, tmp_path / "a", BenchmarkSettings("face"))
    with pytest.raises(ManifestError, match="does not exist"):
        build_benchmark(tmp_path / "nowhere", tmp_path / "a", BenchmarkSettings("face"))
    (face_dir / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ManifestError, match="broken.png cannot be read"):
        build_benchmark(face_dir, tmp_path / "a", BenchmarkSettings("face"))
    (face_dir / "broken.png").unlink()

    with pytest.raises(ConfigError, match="asked to hold out 22 tasks, but there are only 21"):
        build_benchmark(face_dir, tmp_path / "a", BenchmarkSettings("face", test_size=22))
    with pytest.raises(ConfigError, match="asked for 22 pairs, but 7 images give only 21"):
        build_benchmark(face_dir, tmp_path / "a", BenchmarkSettings("face", pairs=22))
    for bad in ({"test_size": 1.0}, {"test_size": -1}, {"pairs": 0}, {"seed": -1}, {"kind": "cat"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            BenchmarkSettings(**{"kind": "face", **bad})


def test_an_existing_output_folder_is_never_overwritten(tmp_path, face_dir):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"output folder {out} already exists and is not empty"):
        build_benchmark(face_dir, out, BenchmarkSettings("face"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    build_benchmark(face_dir, out, BenchmarkSettings("face"))  # an empty folder is fine
    with pytest.raises(ConfigError, match="already exists"):
        build_benchmark(face_dir, out, BenchmarkSettings("face"))


# ---- VLM prompts ----------------------------------------------------------------------------------------


def test_scene_sentences_are_accepted_only_with_both_captions_at_their_own_words():
    assert accept_scene_sentence('"A young woman hands a map to an old man."\n', ["a young woman", "an old man"]) == "a young woman hands a map to an old man."
    assert accept_scene_sentence("\n  an old man waves at a young woman\nSecond line", ["a young woman", "an old man"]) == "an old man waves at a young woman"
    assert accept_scene_sentence("Two people hold a map.", ["a young woman", "an old man"]) is None
    assert accept_scene_sentence("a dog with a red collar sits next to a dog", ["a dog", "a dog with a red collar"]) is None  # overlap
    assert accept_scene_sentence("", ["a dog", "a cat"]) is None


class StubDescriber:
    """Answers a good sentence (capitalized, quoted) unless the captions are "a person" / "another person"."""

    source = "stub-vlm"

    def __init__(self):
        self.calls = []

    def describe(self, images, captions):
        self.calls.append((tuple(image.size for image in images), tuple(captions)))
        if "another person" in captions:
            return "Two people in a park."
        return f'"{captions[0].capitalize()} shares an umbrella with {captions[1]} in the rain."'


def test_vlm_prompts_with_fallback_to_the_templates(tmp_path, face_dir, face_crops):
    describer = StubDescriber()
    report = build_benchmark(face_dir, tmp_path / "vlm", BenchmarkSettings("face", test_size=3), describer)
    build_benchmark(face_dir, tmp_path / "templates", BenchmarkSettings("face", test_size=3))
    assert len(describer.calls) == 21 and report.fallbacks == 10  # C(5, 2) pairs of two uncaptioned faces
    first_sizes = {(c.shape[1], c.shape[0]) for c in face_crops}
    assert all(size in first_sizes for sizes, _ in describer.calls for size in sizes)  # the references themselves
    vlm, templates = (_lines(tmp_path / name / "train.jsonl") + _lines(tmp_path / name / "test.jsonl") for name in ("vlm", "templates"))
    for described, templated in zip(vlm, templates):
        _assert_captions_locate_their_words(described)
        if "another person" in [ref["caption"] for ref in described["references"]]:
            assert described == templated  # the fallback is the template prompt
        else:
            c0, c1 = (ref["caption"] for ref in described["references"])
            assert described["prompt"] == f"{c0} shares an umbrella with {c1} in the rain."
    prompts = json.loads((tmp_path / "vlm" / "benchmark.json").read_text())["prompts"]
    assert (prompts["source"], prompts["vlm_dir"], prompts["vlm_fallbacks"]) == ("vlm", "stub-vlm", 10)


def _tiny_vlm(folder: Path) -> None:
    """A random-init Llava (tiny CLIP vision tower + tiny Llama) with an in-memory word-level tokenizer,
    saved as a local image-text-to-text folder. Its vocabulary holds no caption word, so its answers can
    never contain a caption."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "sun", "blue", "tree", "runs", "over", "hill", "."]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)])  # split out of "<image><image>..."
    chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}), tokenizer=tokenizer,
        patch_size=8, vision_feature_select_strategy="default", chat_template=chat_template, image_token="<image>", num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=1, bos_token_id=2, eos_token_id=3),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.mark.slow  # imports transformers and torch (seconds)
def test_a_local_vlm_folder_is_loaded_and_its_bad_answers_fall_back(tmp_path, face_dir):
    with pytest.raises(ConfigError, match=f"--vlm-dir {tmp_path / 'missing'}: no such folder"):
        VlmSceneDescriber(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"--vlm-dir {tmp_path / 'empty'}: cannot load"):
        VlmSceneDescriber(tmp_path / "empty")

    _tiny_vlm(tmp_path / "vlm")
    describer = VlmSceneDescriber(tmp_path / "vlm")
    answer = describer.describe([Image.open(face_dir / "face-0.png"), Image.open(face_dir / "face-1.png")], ["an astronaut", "a person"])
    assert isinstance(answer, str) and answer == describer.describe(
        [Image.open(face_dir / "face-0.png"), Image.open(face_dir / "face-1.png")], ["an astronaut", "a person"]
    )  # greedy decoding: deterministic
    report = build_benchmark(face_dir, tmp_path / "bench", BenchmarkSettings("face", pairs=4, test_size=1), describer)
    build_benchmark(face_dir, tmp_path / "templates", BenchmarkSettings("face", pairs=4, test_size=1))
    assert report.fallbacks == 4
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "bench" / name).read_bytes() == (tmp_path / "templates" / name).read_bytes()
    prompts = json.loads((tmp_path / "bench" / "benchmark.json").read_text())["prompts"]
    assert (prompts["source"], prompts["vlm_dir"], prompts["vlm_fallbacks"]) == ("vlm", str(tmp_path / "vlm"), 4)


# ---- the script -----------------------------------------------------------------------------------------


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "build_benchmark.py"), *args], capture_output=True, text=True, timeout=120)


def test_script_end_to_end_and_one_line_errors(tmp_path, face_dir):
    out = tmp_path / "bench"
    done = _script("faces", str(face_dir), "--out", str(out), "--test-size", "4", "--seed", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"{out}: 17 train and 4 test tasks"
    assert len(ManifestTasks(out / "train.jsonl", seed=0).tasks) == 17 and len(ManifestTasks(out / "test.jsonl", seed=0).tasks) == 4
    library = tmp_path / "library"
    build_benchmark(face_dir, library, BenchmarkSettings("face", test_size=4, seed=2))
    assert (out / "train.jsonl").read_bytes() == (library / "train.jsonl").read_bytes()

    fraction = _script("faces", str(face_dir), "--out", str(tmp_path / "fraction"), "--test-size", "0.5", "--pairs", "6")
    assert fraction.returncode == 0 and fraction.stdout.strip().endswith(": 3 train and 3 test tasks"), fraction.stderr[-2000:]

    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(single / "only.png")
    objects = _object_dir(tmp_path)
    for args, message in [
        (("faces", str(face_dir), "--out", str(out)), f"output folder {out} already exists"),
        (("faces", str(single), "--out", str(tmp_path / "x")), f"image folder {single}: found 1 image"),
        (("objects", str(objects), "--out", str(tmp_path / "x")), "item-0.png has no caption"),
        (("faces", str(face_dir), "--out", str(tmp_path / "x"), "--test-size", "30"), "test_size: asked to hold out 30 tasks"),
        (("faces", str(face_dir), "--out", str(tmp_path / "x"), "--vlm-dir", str(tmp_path / "no")), f"--vlm-dir {tmp_path / 'no'}: no such folder"),
    ]:
        failed = _script(*args)
        assert failed.returncode == 2, (args, failed.stdout, failed.stderr)
        error_lines = [line for line in failed.stderr.splitlines() if line.startswith("build_benchmark:")]
        assert len(error_lines) == 1 and message in error_lines[0], failed.stderr
        assert "Traceback" not in failed.stderr
    assert not (tmp_path / "x").exists()
    assert _script("faces", str(face_dir), "--out", str(tmp_path / "y"), "--test-size", "many").returncode == 2  # argparse
