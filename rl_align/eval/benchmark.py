"""Two-subject benchmarks after MultiCrafter (Sec. 5.1, Appendix D): a pool of reference images (one face
identity, or one captioned object, per image) is paired, one prompt is written per pair, and a seeded
held-out part of the tasks becomes the benchmark (the paper: 160 faces, 12,720 pairs, 1,000 held out,
the rest RL training data).

Source folder: the images ``*.png``, ``*.jpg``, ``*.jpeg``, ``*.webp`` (sorted by name), and the subject
phrase of each image from ``captions.jsonl`` (lines ``{"image": "anna.png", "caption": "a young woman",
"category": "person"}``, category optional) or else from a sidecar ``anna.txt``; a face without either is
"a person" (DEFAULT_FACE_CAPTION), an object without either is an error.

Prompts come from fixed templates (FACE_TEMPLATES, OBJECT_TEMPLATES; the template of each task is drawn
from the seed) or from a local vision-language model (VlmSceneDescriber, the paper's Qwen2.5-VL step),
whose sentence is kept only when it contains both subject phrases, else the template prompt is used and
counted as a fallback. Every caption is a substring of its prompt, at its own place: the policy locates
a reference's item phrase as the first case-insensitive occurrence of its caption (policies.policy), so
when the two captions of a pair are equal the second becomes "another ..." ("a person and another person
having coffee at a street cafe"), as MUSAR's diptych captions do.

Output folder (self-contained, byte-identical for the same inputs and seed):
- ``references/``: the referenced images, copied byte for byte under their source names;
- ``train.jsonl``, ``test.jsonl``: tasks in the ``rl_align.ippo.tasks.ManifestTasks`` format, image paths
  relative to the folder;
- ``benchmark.json``: how it was built (source, counts, seed, split, prompt source, fallbacks).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Protocol, Sequence

import numpy as np
from PIL import Image

from rl_align.core.errors import ConfigError, ManifestError
from rl_align.core.jsonl import json_objects

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTIONS_NAME = "captions.jsonl"
DEFAULT_FACE_CAPTION = "a person"
TRAIN_NAME, TEST_NAME, REPORT_NAME, REFERENCES_FOLDER = "train.jsonl", "test.jsonl", "benchmark.json", "references"
SubjectKind = Literal["face", "object"]

# {0} and {1} are the two subject phrases, inserted verbatim (never capitalized, so they stay substrings).
FACE_TEMPLATES = (
    "{0} and {1} having coffee at a street cafe",
    "{0} and {1} walking together through a park in autumn",
    "{0} talking with {1} in a modern office",
    "{0} and {1} posing for a photo on a beach at sunset",
    "{1} and {0} cooking dinner together in a bright kitchen",
    "{0} and {1} sitting on a bench in a snowy city square",
    "{0} and {1} hiking on a mountain trail",
    "{0} shaking hands with {1} at a conference",
    "{0} and {1} reading books in a cozy library",
    "{0} and {1} laughing together at a dinner party",
    "{1} handing a gift to {0} in a living room",
    "{0} and {1} riding bicycles along a river at dawn",
)
OBJECT_TEMPLATES = (
    "{0} and {1} on a wooden table",
    "{0} next to {1} on a kitchen counter",
    "{0} and {1} on a picnic blanket in a sunny park",
    "{0} beside {1} on a shelf in a bright room",
    "{0} and {1} on the sand of a beach",
    "{1} in front of {0} on a marble floor",
    "{0} and {1} on a desk near a window",
    "{0} and {1} in the snow under soft morning light",
)
TEMPLATES: dict[str, tuple[str, ...]] = {"face": FACE_TEMPLATES, "object": OBJECT_TEMPLATES}

# Independent random streams of one seed, so e.g. asking for another split leaves the pairs and prompts as they are.
_PAIR_STREAM, _TEMPLATE_STREAM, _SPLIT_STREAM = 0, 1, 2
_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+(?=\S)", re.IGNORECASE)
_VLM_MAX_SIDE = 448  # references are shrunk to this before the VLM sees them: a face crop needs no more, and tokens cost time
_VLM_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class BenchmarkSettings:
    kind: SubjectKind
    pairs: int | None = None  # tasks to draw from all unordered pairs (seeded, without repeats); None: every pair
    test_size: int | float = 0.1  # held-out tasks: a count (int >= 0) or a fraction in (0, 1) of the tasks, rounded half up
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TEMPLATES:
            raise ConfigError(f"kind: expected one of {', '.join(TEMPLATES)}, got {self.kind!r}")
        if self.pairs is not None and (isinstance(self.pairs, bool) or not isinstance(self.pairs, int) or self.pairs < 1):
            raise ConfigError(f"pairs: expected a positive number of pairs, got {self.pairs!r}")
        size = self.test_size
        is_count = isinstance(size, int) and not isinstance(size, bool) and size >= 0
        is_fraction = isinstance(size, float) and 0.0 < size < 1.0
        if not (is_count or is_fraction):
            raise ConfigError(f"test_size: expected a count of tasks (an integer >= 0) or a fraction strictly between 0 and 1, got {size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: expected an integer >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class Subject:
    """One reference image of the pool and its subject phrase."""

    image: Path
    caption: str
    category: str | None
    caption_source: Literal["captions.jsonl", "sidecar", "default"]


class SceneDescriber(Protocol):
    """Writes one scene sentence for a pair of references (the VLM prompt source)."""

    source: str  # what benchmark.json records as the prompt source (the model folder)

    def describe(self, images: Sequence[Image.Image], captions: Sequence[str]) -> str: ...


class BenchmarkReport(NamedTuple):
    out: Path
    train: int  # tasks in train.jsonl
    test: int  # tasks in test.jsonl
    fallbacks: int  # pairs whose VLM sentence was rejected and got the template prompt (0 with templates only)


# ---- the source folder ----------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (IMAGE_SUFFIXES, any case), sorted by name; at least two."""
    if not folder.is_dir():
        raise ManifestError(f"image folder {folder} does not exist (expected a folder of {', '.join(IMAGE_SUFFIXES)} files)")
    images = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
    if len(images) < 2:
        raise ManifestError(f"image folder {folder}: found {len(images)} image(s) ({', '.join(IMAGE_SUFFIXES)}), a pair needs at least 2")
    return images


def read_captions_file(path: Path, image_names: set[str]) -> dict[str, tuple[str, str | None]]:
    """image name -> (caption, category or None) from a captions.jsonl; every line must name an image of
    the folder, once, with a non-empty string caption and, if any, a non-empty string category."""
    entries: dict[str, tuple[str, str | None]] = {}
    for where, record in json_objects(path):
        if not isinstance(record.get("image"), str):
            raise ManifestError(f"{where}: expected an object with a string 'image' (a file name in {path.parent})")
        name = record["image"]
        if name not in image_names:
            raise ManifestError(f"{where}: image {name!r} is not an image file of {path.parent}")
        if name in entries:
            raise ManifestError(f"{where}: image {name!r} is captioned a second time")
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ManifestError(f"{where}: caption of {name!r}: expected a non-empty string, got {caption!r}")
        category = record.get("category")
        if category is not None and (not isinstance(category, str) or not category.strip()):
            raise ManifestError(f"{where}: category of {name!r}: expected a non-empty string, got {category!r}")
        entries[name] = (caption.strip(), category.strip() if category is not None else None)
    return entries


def read_subjects(folder: Path, kind: SubjectKind) -> list[Subject]:
    """Every image of ``folder`` with its caption: captions.jsonl first, else the sidecar ``<stem>.txt``,
    else (faces only) DEFAULT_FACE_CAPTION. Categories are given for every image or for none, because a
    manifest task needs them on all its references or on none."""
    images = list_images(folder)
    captions_file = folder / CAPTIONS_NAME
    listed = read_captions_file(captions_file, {p.name for p in images}) if captions_file.is_file() else {}
    subjects = []
    for image in images:
        _check_readable(image)
        sidecar = image.with_suffix(".txt")
        if image.name in listed:
            caption, category = listed[image.name]
            subjects.append(Subject(image, caption, category, "captions.jsonl"))
        elif sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
            if not caption:
                raise ManifestError(f"caption file {sidecar} is empty (expected the subject phrase of {image.name}, e.g. 'a red backpack')")
            subjects.append(Subject(image, caption, None, "sidecar"))
        elif kind == "face":
            subjects.append(Subject(image, DEFAULT_FACE_CAPTION, None, "default"))
        else:
            raise ManifestError(
                f"object image {image} has no caption: add a line {{\"image\": \"{image.name}\", \"caption\": ...}} to "
                f"{captions_file} or a sidecar {sidecar.name} next to it"
            )
    with_category = [s for s in subjects if s.category is not None]
    if with_category and len(with_category) < len(subjects):
        missing = next(s for s in subjects if s.category is None)
        raise ManifestError(f"{captions_file}: {missing.image.name} has no 'category' but other images have one; give every image a category or none")
    return subjects


def _check_readable(image: Path) -> None:
    try:
        with Image.open(image) as opened:
            opened.load()
    except OSError as exc:
        raise ManifestError(f"image {image} cannot be read ({exc})") from None


# ---- pairs, prompts and the split -----------------------------------------------------------------------


def pair_count(images: int) -> int:
    return images * (images - 1) // 2


def choose_pairs(images: int, pairs: int | None, seed: int) -> list[tuple[int, int]]:
    """Unordered pairs (i, j), i < j, of distinct images in lexicographic order: all of them, or a seeded
    sample of ``pairs`` of them without repeats."""
    total = pair_count(images)
    if pairs is None:
        return _pairs_at(range(total), images)
    if pairs > total:
        raise ConfigError(f"pairs: asked for {pairs} pairs, but {images} images give only {total} distinct pairs")
    chosen = np.random.default_rng((seed, _PAIR_STREAM)).choice(total, size=pairs, replace=False)
    return _pairs_at(sorted(int(k) for k in chosen), images)


def _pairs_at(indices: Sequence[int], images: int) -> list[tuple[int, int]]:
    """The pairs at increasing positions ``indices`` of the lexicographic list of all pairs, found in one
    walk over its rows (row i holds the images - 1 - i pairs (i, j > i)) without building that list."""
    pairs, row, row_start = [], 0, 0
    for index in indices:
        while index >= row_start + images - 1 - row:
            row_start += images - 1 - row
            row += 1
        pairs.append((row, row + 1 + index - row_start))
    return pairs


def another_caption(caption: str) -> str:
    """"a person" -> "another person", "the red cup" -> "another red cup", "Anna" -> "another Anna"."""
    return "another " + _LEADING_ARTICLE.sub("", caption, count=1)


def pair_captions(first: str, second: str) -> tuple[str, str]:
    """The two item phrases of a pair: equal captions (ignoring case) would locate the same words, so the
    second becomes another_caption."""
    return (first, another_caption(second)) if first.lower() == second.lower() else (first, second)


def caption_spans(prompt: str, captions: Sequence[str]) -> list[tuple[int, int]] | None:
    """[start, end) of each caption's first case-insensitive occurrence in ``prompt`` (how the policy
    locates item phrases), or None when one does not occur."""
    lowered = prompt.lower()
    spans = []
    for caption in captions:
        start = lowered.find(caption.lower())
        if start < 0:
            return None
        spans.append((start, start + len(caption)))
    return spans


def fill_template(template: str, captions: Sequence[str]) -> str | None:
    """``template`` with ``captions`` at {0}, {1}, ..., or None when a caption's first occurrence is not the
    place it was put (it also occurs in the template's words or inside the other caption)."""
    pieces, placed = [], {}
    for literal, field, _, _ in string.Formatter().parse(template):
        pieces.append(literal)
        if field is not None:
            start = sum(map(len, pieces))
            placed[int(field)] = (start, start + len(captions[int(field)]))
            pieces.append(captions[int(field)])
    prompt = "".join(pieces)
    return prompt if caption_spans(prompt, captions) == [placed[i] for i in range(len(captions))] else None


def template_prompt(templates: Sequence[str], first_choice: int, captions: tuple[str, str]) -> tuple[str, tuple[int, int]]:
    """The prompt of a pair and the order of its references in it ((0, 1) or (1, 0)): the template
    ``first_choice`` if both captions land on their own place, else the next templates in turn, each
    with the references in both orders (a caption inside the other one must come first)."""
    for step in range(len(templates)):
        template = templates[(first_choice + step) % len(templates)]
        for order in ((0, 1), (1, 0)):
            prompt = fill_template(template, [captions[order[0]], captions[order[1]]])
            if prompt is not None:
                return prompt, order
    raise ManifestError(
        f"captions {captions[0]!r} and {captions[1]!r}: no template places both so that each is found at its own words; "
        f"make the captions more distinct"
    )


def accept_scene_sentence(text: str, captions: Sequence[str]) -> str | None:
    """A VLM answer as a prompt: its first non-empty line without surrounding quotes, with each caption's
    first occurrence rewritten to the caption's exact case; None when a caption is missing or two first
    occurrences overlap (an item phrase would point at the other subject's words)."""
    lines = [line.strip().strip("\"'").strip() for line in text.splitlines()]
    sentence = next((line for line in lines if line), "")
    spans = caption_spans(sentence, captions)
    if not sentence or spans is None:
        return None
    ordered = sorted(zip(spans, captions))
    if any(previous[0][1] > current[0][0] for previous, current in zip(ordered, ordered[1:])):
        return None
    for (start, end), caption in reversed(ordered):
        sentence = sentence[:start] + caption + sentence[end:]
    return sentence


def split_size(test_size: int | float, tasks: int) -> int:
    """Held-out tasks: the count itself, or the fraction of ``tasks`` rounded half up; at most ``tasks``."""
    count = test_size if isinstance(test_size, int) else math.floor(test_size * tasks + 0.5)
    if count > tasks:
        raise ConfigError(f"test_size: asked to hold out {count} tasks, but there are only {tasks}")
    return count


def split_tasks(tasks: int, test_count: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, test) task indices, each increasing: a seeded random ``test_count`` of them held out."""
    held_out = set(int(k) for k in np.random.default_rng((seed, _SPLIT_STREAM)).permutation(tasks)[:test_count])
    return [k for k in range(tasks) if k not in held_out], sorted(held_out)


# ---- the VLM prompt source ------------------------------------------------------------------------------


class VlmSceneDescriber:
    """A local transformers image-text-to-text model (e.g. Qwen2.5-VL) asked, with the two references as
    images, for one sentence describing a scene with both subjects; greedy decoding, so it is
    deterministic on one machine."""

    def __init__(self, model_dir: str | Path):
        path = Path(model_dir)
        if not path.is_dir():
            raise ConfigError(f"--vlm-dir {path}: no such folder (expected a local transformers image-text-to-text model, e.g. Qwen2.5-VL)")
        import torch  # the template path needs neither torch nor transformers, which take seconds to import
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype="auto")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--vlm-dir {path}: cannot load an image-text-to-text model and its processor from it ({exc})") from None
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.source = str(path)

    def describe(self, images: Sequence[Image.Image], captions: Sequence[str]) -> str:
        phrases = " and ".join(f'"{c}"' for c in captions)
        instruction = (
            f"The images show {phrases}, in this order. Write one natural sentence describing a photo of a scene in which "
            f"{phrases} appear together, doing something together. Use the exact phrases {phrases}. Answer with the sentence only."
        )
        messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": instruction}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        shrunk = [_shrink(image) for image in images]
        inputs = self.processor(images=shrunk, text=[text], return_tensors="pt").to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=_VLM_MAX_NEW_TOKENS, do_sample=False)  # generate() runs without grad
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def _shrink(image: Image.Image) -> Image.Image:
    scale = _VLM_MAX_SIDE / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BICUBIC)


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        return opened.convert("RGB")


# ---- the builder ----------------------------------------------------------------------------------------


def _task_record(prompt: str, subjects: Sequence[Subject], captions: Sequence[str], kind: SubjectKind) -> dict:
    references = []
    for subject, caption in zip(subjects, captions):
        reference = {"image": f"{REFERENCES_FOLDER}/{subject.image.name}", "kind": kind, "caption": caption}
        if subject.category is not None:
            reference["category"] = subject.category
        references.append(reference)
    return {"prompt": prompt, "references": references}


def _check_output_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} already exists and is not empty; choose a new folder (nothing is overwritten)")


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def _task_records(subjects: Sequence[Subject], pairs: Sequence[tuple[int, int]], settings: BenchmarkSettings,
                  describer: SceneDescriber | None) -> tuple[list[dict], int]:
    """One task record per pair and the number of VLM fallbacks. The template prompt is made for every
    pair, also with a describer: it is the fallback, and a pair no template can place fails up front."""
    templates = TEMPLATES[settings.kind]
    first_choices = np.random.default_rng((settings.seed, _TEMPLATE_STREAM)).integers(len(templates), size=len(pairs))
    records, fallbacks = [], 0
    for number, ((i, j), first_choice) in enumerate(zip(pairs, first_choices), 1):
        captions = pair_captions(subjects[i].caption, subjects[j].caption)
        prompt, order = template_prompt(templates, int(first_choice), captions)
        references, reference_captions = [(subjects[i], subjects[j])[k] for k in order], [captions[k] for k in order]
        if describer is not None:
            answer = describer.describe([_rgb(subjects[i].image), _rgb(subjects[j].image)], captions)
            sentence = accept_scene_sentence(answer, captions)
            if sentence is None:
                fallbacks += 1
                log.warning("pair %s + %s: VLM answer %r lacks the captions %r and %r at their own words; using the template prompt",
                            subjects[i].image.name, subjects[j].image.name, answer[:200], *captions)
            else:
                prompt, references, reference_captions = sentence, [subjects[i], subjects[j]], list(captions)
            if number % 100 == 0:
                log.info("described %d/%d pairs (%d fallbacks)", number, len(pairs), fallbacks)
        records.append(_task_record(prompt, references, reference_captions, settings.kind))
    return records, fallbacks


def build_benchmark(source: str | Path, out: str | Path, settings: BenchmarkSettings, describer: SceneDescriber | None = None) -> BenchmarkReport:
    """Pair the references of ``source``, write one prompt per pair (templates, or ``describer`` with the
    template as fallback), hold out the test split and write the benchmark folder ``out`` (see the
    module docstring). Everything is checked before anything is written; ``out`` must be new or empty."""
    source, out = Path(source).resolve(), Path(out)
    _check_output_folder(out)
    subjects = read_subjects(source, settings.kind)
    pairs = choose_pairs(len(subjects), settings.pairs, settings.seed)
    test_count = split_size(settings.test_size, len(pairs))
    log.info("%d %s images in %s: %d of %d pairs", len(subjects), settings.kind, source, len(pairs), pair_count(len(subjects)))
    records, fallbacks = _task_records(subjects, pairs, settings, describer)
    train, test = split_tasks(len(records), test_count, settings.seed)
    for name, indices in ((TRAIN_NAME, train), (TEST_NAME, test)):
        if not indices:
            log.warning("%s holds no tasks (test_size %s of %d tasks)", name, settings.test_size, len(records))

    (out / REFERENCES_FOLDER).mkdir(parents=True, exist_ok=True)
    used = sorted({k for pair in pairs for k in pair})
    for k in used:
        shutil.copyfile(subjects[k].image, out / REFERENCES_FOLDER / subjects[k].image.name)
    _write_jsonl(out / TRAIN_NAME, [records[k] for k in train])
    _write_jsonl(out / TEST_NAME, [records[k] for k in test])
    caption_sources = [s.caption_source for s in subjects]
    report = {
        "kind": settings.kind,
        "source": str(source),
        "images": len(subjects),
        "references_copied": len(used),
        "captions": {name: caption_sources.count(name) for name in ("captions.jsonl", "sidecar", "default")},
        "seed": settings.seed,
        "pairs": {"possible": pair_count(len(subjects)), "asked": settings.pairs, "written": len(records)},
        "split": {"test_size": settings.test_size, "train": len(train), "test": len(test)},
        "prompts": {
            "source": "templates" if describer is None else "vlm",
            "vlm_dir": None if describer is None else describer.source,
            "vlm_fallbacks": fallbacks,
            "templates": list(TEMPLATES[settings.kind]),
        },
        "format": "rl_align.ippo.tasks.ManifestTasks JSON Lines; reference image paths relative to this folder",
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s: %d train and %d test tasks, %d VLM fallbacks", out, len(train), len(test), fallbacks)
    return BenchmarkReport(out, len(train), len(test), fallbacks)
