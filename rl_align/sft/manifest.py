"""The supervised warm-start dataset: a JSON Lines manifest, one training sample per line, every path
relative to the manifest's folder:

    {"target": "targets/0001.png", "prompt": "a red circle and a blue square on a white background",
     "subjects": [{"reference": "refs/0001-0.png", "category": "circle", "caption": "a red circle",
                   "mask": "masks/0001-0.png", "reference_mask": "refs/0001-0-mask.png"}, ...],
     "layout": "layouts/0001.png"}

- ``target``: the image to generate; ``prompt``: its text.
- ``subjects`` (at least one), in reference order: ``reference`` image, ``category`` (one of the
  configured categories), ``caption`` (the subject's phrase; stages that use item phrases need it inside
  the prompt), ``mask``: the subject's region in the target (a grey-scale image of the target's size,
  non-zero inside), optional ``reference_mask``: the subject's region in the reference (the reference's size).
- optional ``layout``: an MS-CustomNet layout map (the references pasted at their boxes); kept for
  inspection and for models that take it, not used by the FLUX stages.

``check_manifest`` reads every line and reports every problem with its line number; ``load_manifest``
refuses a manifest with any problem, so training never starts on bad data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from rl_align.core.errors import ManifestError

SAMPLE_KEYS = ("target", "prompt", "subjects", "layout")
SUBJECT_KEYS = ("reference", "category", "caption", "mask", "reference_mask")


@dataclass(frozen=True)
class SubjectRecord:
    reference: str  # path relative to the manifest
    category: str
    caption: str
    mask: str  # the subject's region in the target, same size as the target
    reference_mask: str | None = None  # the subject's region in the reference, same size as the reference


@dataclass(frozen=True)
class SampleRecord:
    target: str  # path relative to the manifest
    prompt: str
    subjects: tuple[SubjectRecord, ...]
    layout: str | None = None
    line: int = 0  # line number in the manifest it was read from (0: built in memory)
    target_size: tuple[int, int] | None = None  # (width, height), known once check_manifest has read the file

    def to_json(self) -> dict:
        subjects = []
        for s in self.subjects:
            entry = {"reference": s.reference, "category": s.category, "caption": s.caption, "mask": s.mask}
            if s.reference_mask is not None:
                entry["reference_mask"] = s.reference_mask
            subjects.append(entry)
        record = {"target": self.target, "prompt": self.prompt, "subjects": subjects}
        if self.layout is not None:
            record["layout"] = self.layout
        return record


class ManifestProblem(NamedTuple):
    line: int
    reason: str


def write_manifest(samples: Iterable[SampleRecord], path: str | Path) -> Path:
    """Write ``samples`` as JSON Lines (paths must already be relative to ``path``'s folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s.to_json()) + "\n" for s in samples))
    return path


def check_manifest(path: str | Path, categories: Sequence[str] = ()) -> tuple[list[SampleRecord], list[ManifestProblem]]:
    """Parse and check every line of a manifest: JSON shape and keys, files present and readable, masks
    the size of their image and not empty, categories among ``categories`` (any category when empty).
    Returns the good samples and one problem per bad line (every reason found on that line)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist (expected a JSON Lines file, one training sample per line)")
    samples, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        reasons: list[str] = []
        sample = _parse_line(line, number, path.parent, categories, reasons)
        if reasons:
            problems.append(ManifestProblem(number, "; ".join(reasons)))
        elif sample is not None:
            samples.append(sample)
    if not samples and not problems:
        problems.append(ManifestProblem(0, "the manifest has no samples"))
    return samples, problems


def load_manifest(path: str | Path, categories: Sequence[str] = ()) -> list[SampleRecord]:
    """The samples of a manifest that passes check_manifest; otherwise ManifestError listing the problems."""
    samples, problems = check_manifest(path, categories)
    if problems:
        shown = "\n".join(f"  {path}:{p.line}: {p.reason}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more bad lines" if len(problems) > 20 else ""
        raise ManifestError(
            f"{path}: {len(problems)} bad line(s); fix them (`python scripts/sft.py validate {path}`) before training:\n{shown}{more}"
        )
    return samples


def read_image(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """bool (H, W): non-zero pixels of the grey-scale image (alpha ignored)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


def _image_size(path: Path, field: str, reasons: list[str]) -> tuple[int, int] | None:
    """(width, height) of an image file, or None with a reason."""
    if not path.is_file():
        reasons.append(f"{field}: missing file {path}")
        return None
    try:
        with Image.open(path) as image:
            image.verify()  # reads the whole file: catches truncated images without decoding twice
        with Image.open(path) as image:
            return image.size
    except Exception as exc:  # PIL raises many types for corrupt files
        reasons.append(f"{field}: cannot read {path} as an image ({exc})")
        return None


def _check_mask(path: Path, field: str, expected: tuple[int, int] | None, of: str, reasons: list[str]) -> None:
    size = _image_size(path, field, reasons)
    if size is None:
        return
    if expected is not None and size != expected:
        reasons.append(f"{field}: mask size {size[0]}x{size[1]} does not match the {of} size {expected[0]}x{expected[1]}")
        return
    if not read_mask(path).any():
        reasons.append(f"{field}: mask {path} is empty (no non-zero pixel)")


def _string(record: dict, key: str, field: str, reasons: list[str], required: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        reasons.append(f"{field}{key}: expected a non-empty string, got {value!r}")
        return None
    return value


def _parse_line(line: str, number: int, root: Path, categories: Sequence[str], reasons: list[str]) -> SampleRecord | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        reasons.append(f"not valid JSON ({exc.msg} at column {exc.colno})")
        return None
    if not isinstance(record, dict):
        reasons.append(f"expected a JSON object, got {type(record).__name__}")
        return None
    unknown = sorted(set(record) - set(SAMPLE_KEYS))
    if unknown:
        reasons.append(f"unknown key(s) {unknown}; a sample has {', '.join(SAMPLE_KEYS)}")
    target = _string(record, "target", "", reasons)
    prompt = _string(record, "prompt", "", reasons)
    layout = _string(record, "layout", "", reasons, required=False)
    target_size = _image_size(root / target, "target", reasons) if target else None
    if layout:
        _image_size(root / layout, "layout", reasons)
    subjects_json = record.get("subjects")
    if not isinstance(subjects_json, list) or not subjects_json:
        reasons.append(f"subjects: expected a non-empty list of subjects, got {subjects_json!r}")
        return None
    subjects = []
    for i, entry in enumerate(subjects_json):
        field = f"subjects[{i}]."
        if not isinstance(entry, dict):
            reasons.append(f"subjects[{i}]: expected an object, got {entry!r}")
            continue
        unknown = sorted(set(entry) - set(SUBJECT_KEYS))
        if unknown:
            reasons.append(f"subjects[{i}]: unknown key(s) {unknown}; a subject has {', '.join(SUBJECT_KEYS)}")
        reference = _string(entry, "reference", field, reasons)
        category = _string(entry, "category", field, reasons)
        caption = _string(entry, "caption", field, reasons)
        mask = _string(entry, "mask", field, reasons)
        reference_mask = _string(entry, "reference_mask", field, reasons, required=False)
        if category and categories and category not in categories:
            reasons.append(f"{field}category: unknown category {category!r}; expected one of {', '.join(categories)}")
        reference_size = _image_size(root / reference, field + "reference", reasons) if reference else None
        if mask:
            _check_mask(root / mask, field + "mask", target_size, "target", reasons)
        if reference_mask:
            _check_mask(root / reference_mask, field + "reference_mask", reference_size, "reference", reasons)
        if reference and category and caption and mask:
            subjects.append(SubjectRecord(reference, category, caption, mask, reference_mask))
    if reasons:
        return None
    return SampleRecord(target, prompt, tuple(subjects), layout, number, target_size)
