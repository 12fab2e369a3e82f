"""Where RL groups come from: one task (a prompt and its reference subjects) per group.

Two sources behind one interface, both deterministic in (seed, iteration, group):
- ``SyntheticShapeTasks``: coloured-shape subjects made offline (rl_align.core.synthetic), for the quickstart;
- ``ManifestTasks``: a JSON Lines manifest, one task per line, image paths relative to the manifest:
  {"prompt": "two friends at a cafe", "references": [{"image": "refs/anna.png", "kind": "face", "caption": "a woman",
   "category": "face"}, ...]}
  ("category" is optional: it picks the reference's condition id under the condition_id position scheme)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np
from PIL import Image

from rewards.types import SUBJECT_KINDS, ReferenceSubject
from rl_align.core.errors import ManifestError
from rl_align.core.jsonl import json_objects
from rl_align.core.synthetic import SHAPES, render_reference, sample_subjects, scene_prompt
from samplers.noise import key_seed


TASK_KEYS = frozenset({"prompt", "references"})
REFERENCE_KEYS = frozenset({"image", "kind", "caption", "category"})


@dataclass(frozen=True, eq=False)
class Task:
    prompt: str
    references: tuple[ReferenceSubject, ...]
    categories: tuple[str, ...] | None = None  # one per reference when known (condition ids)


class TaskSource(Protocol):
    def task(self, iteration: int, group: int) -> Task: ...

    def check_categories(self, known: Sequence[str]) -> None:
        """Raise ManifestError naming the first task whose reference category is not in ``known`` (the
        policy's condition_categories), so a condition-id run fails at start-up, not when it is sampled."""


@dataclass(frozen=True)
class TaskConfig:
    source: Literal["synthetic", "manifest"] = "synthetic"
    manifest: str = ""  # JSON Lines file (source == "manifest")
    min_subjects: int = 1  # synthetic: subjects per task, drawn uniformly in [min, max]
    max_subjects: int = 2
    reference_size: int = 64  # synthetic: side of each reference image in pixels

    def __post_init__(self) -> None:
        if not 1 <= self.min_subjects <= self.max_subjects:
            raise ValueError(f"need 1 <= min_subjects <= max_subjects, got {self.min_subjects}, {self.max_subjects}")
        if self.source == "manifest" and not self.manifest:
            raise ValueError("tasks.source is 'manifest' but tasks.manifest is empty: give the path of a JSON Lines file")


class SyntheticShapeTasks:
    def __init__(self, cfg: TaskConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def task(self, iteration: int, group: int) -> Task:
        rng = np.random.default_rng(key_seed("task", self.seed, iteration, group))
        count = int(rng.integers(self.cfg.min_subjects, self.cfg.max_subjects + 1))
        subjects = sample_subjects(rng, count)
        references = tuple(ReferenceSubject(render_reference(s, self.cfg.reference_size), "object", s.caption) for s in subjects)
        return Task(scene_prompt(subjects), references, tuple(s.shape for s in subjects))

    def check_categories(self, known: Sequence[str]) -> None:
        missing = sorted(set(SHAPES) - set(known))
        if missing:
            raise ManifestError(f"the synthetic tasks have shape categories {missing} that policy.condition_categories {list(known)} lacks")


class ManifestTasks:
    """All tasks of a manifest, validated and loaded at start-up (a bad line fails before training)."""

    def __init__(self, path: str | Path, seed: int):
        self.path, self.seed = Path(path), seed
        if not self.path.is_file():
            raise ManifestError(f"task manifest {self.path} does not exist (expected a JSON Lines file of prompts and references)")
        parsed = [(where, self._parse(where, record)) for where, record in json_objects(self.path)]
        if not parsed:
            raise ManifestError(f"{self.path}: no tasks")
        self.lines = [where for where, _ in parsed]  # "file:line" of each task
        self.tasks = [task for _, task in parsed]

    def check_categories(self, known: Sequence[str]) -> None:
        for where, task in zip(self.lines, self.tasks):
            for i, category in enumerate(task.categories or ()):
                if category not in known:
                    raise ManifestError(f"{where}: references[{i}].category {category!r} has no condition id; policy.condition_categories is {list(known)}")

    def _parse(self, where: str, record: dict) -> Task:
        unknown = sorted(set(record) - TASK_KEYS)
        if unknown:
            raise ManifestError(f"{where}: unknown key {unknown[0]!r}; a task has {', '.join(sorted(TASK_KEYS))}")
        if not isinstance(record.get("prompt"), str):
            raise ManifestError(f"{where}: expected an object with a string 'prompt'")
        references = record.get("references", [])
        if not isinstance(references, list):
            raise ManifestError(f"{where}: 'references' must be a list")
        subjects, categories = [], []
        for i, ref in enumerate(references):
            field = f"{where}: references[{i}]"
            if not isinstance(ref, dict) or not isinstance(ref.get("image"), str):
                raise ManifestError(f"{field}: expected an object with a string 'image' path")
            unknown = sorted(set(ref) - REFERENCE_KEYS)
            if unknown:
                raise ManifestError(f"{field}: unknown key {unknown[0]!r}; a reference has {', '.join(sorted(REFERENCE_KEYS))}")
            if ref.get("kind") not in SUBJECT_KINDS:
                raise ManifestError(f"{field}.kind: expected one of {', '.join(SUBJECT_KINDS)}, got {ref.get('kind')!r}")
            image_path = self.path.parent / ref["image"]
            if not image_path.is_file():
                raise ManifestError(f"{field}.image: file {image_path} does not exist")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is a bad line, not a warning
                    image = np.asarray(Image.open(image_path).convert("RGB"))
            except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ManifestError(f"{field}.image: cannot read {image_path} as an image ({exc})") from None
            subjects.append(ReferenceSubject(image, ref["kind"], str(ref.get("caption", ""))))
            category = ref.get("category")
            if category is not None and not isinstance(category, str):
                raise ManifestError(f"{field}.category: expected a string, got {category!r}")
            categories.append(category)
        if any(c is None for c in categories) and any(c is not None for c in categories):
            raise ManifestError(f"{where}: give every reference a 'category' or none")
        return Task(record["prompt"], tuple(subjects), tuple(categories) if categories and categories[0] is not None else None)

    def task(self, iteration: int, group: int) -> Task:
        return self.tasks[key_seed("task", self.seed, iteration, group) % len(self.tasks)]


def build_task_source(cfg: TaskConfig, seed: int) -> TaskSource:
    return ManifestTasks(cfg.manifest, seed) if cfg.source == "manifest" else SyntheticShapeTasks(cfg, seed)
