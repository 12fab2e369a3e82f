"""MUSAR diptych pairs (musar.txt Sec. 3.2.1) from a single-subject manifest: two samples side by side, the
right subject's caption given the "another" modifier, the target prompt in the two-column template.
Writes PNGs and a ``manifest.jsonl`` (``rl_align.sft.manifest`` format) under its output folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import numpy as np

from rl_align.sft.builders.files import MANIFEST_NAME, resize_mask, resize_rgb, save_mask, save_rgb
from rl_align.sft.manifest import SampleRecord, SubjectRecord, read_image, read_mask, write_manifest

_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+(?=\S)", re.IGNORECASE)




def another_caption(caption: str) -> str:
    """MUSAR's "another" modifier (Sec. 3.2.1, Fig. 2): a leading article (a/an/the, any case) is replaced
    by "another"; a caption without one gets "another " in front.

    "a red circle" -> "another red circle"; "Nourishing scalp oil" -> "another Nourishing scalp oil".
    """
    caption = caption.strip()
    if not caption:
        raise ValueError("caption: expected a non-empty subject caption, got an empty string")
    return "another " + _LEADING_ARTICLE.sub("", caption, count=1)


def diptych_prompt(left_prompt: str, right_prompt: str, right_caption: str) -> tuple[str, str]:
    """The diptych target prompt (MUSAR Fig. 2) and the right subject's caption with "another".

    The first case-insensitive occurrence of ``right_caption`` in ``right_prompt`` becomes
    ``another_caption(right_caption)``; when the caption does not occur, the right prompt is prefixed with
    "<another caption>, " so the modified subject phrase is still in the prompt. Template:
    "Two images concatenated side by side, the left part is: {left}, the right part is: {right}".
    """
    another = another_caption(right_caption)
    occurrence = re.search(re.escape(right_caption.strip()), right_prompt, re.IGNORECASE)
    if occurrence is None:
        right_with_another = f"{another}, {right_prompt}"
    else:
        right_with_another = right_prompt[: occurrence.start()] + another + right_prompt[occurrence.end() :]
    target_prompt = (
        f"Two images concatenated side by side, the left part is: {left_prompt}, the right part is: {right_with_another}"
    )
    return target_prompt, another


class DiptychPair(NamedTuple):
    left: int  # index into the source samples
    right: int


def draw_diptych_pairs(
    categories: Sequence[str], pairing: Literal["random", "same_category"], count: int, rng: np.random.Generator
) -> list[DiptychPair]:
    """``count`` (left, right) pairs of distinct source samples, given each sample's subject category.

    random: left uniform over all samples, right uniform over the others (MUSAR stage 2).
    same_category: left uniform over the samples whose category has at least two samples, right uniform
    over the other samples of that category (MUSAR stage 3, fine-grained intra-class distinctions).
    """
    if count < 1:
        raise ValueError(f"count: expected at least 1 diptych, got {count}")
    if len(categories) < 2:
        raise ValueError(f"a diptych needs two distinct source samples; got {len(categories)} sample(s)")
    if pairing == "random":
        pairs = []
        for _ in range(count):
            left = int(rng.integers(len(categories)))
            right = int(rng.integers(len(categories) - 1))
            pairs.append(DiptychPair(left, right + (right >= left)))  # skip the left sample itself
        return pairs
    if pairing == "same_category":
        members: dict[str, list[int]] = {}
        for index, category in enumerate(categories):
            members.setdefault(category, []).append(index)
        eligible = [index for index, category in enumerate(categories) if len(members[category]) >= 2]
        if not eligible:
            raise ValueError(
                f"same_category pairing needs a category with at least 2 samples; every one of the "
                f"{len(members)} categories ({', '.join(sorted(members))}) has a single sample"
            )
        pairs = []
        for _ in range(count):
            left = eligible[int(rng.integers(len(eligible)))]
            others = [index for index in members[categories[left]] if index != left]
            pairs.append(DiptychPair(left, others[int(rng.integers(len(others)))]))
        return pairs
    raise ValueError(f"pairing: expected 'random' or 'same_category', got {pairing!r}")


def _single_subject(sample: SampleRecord) -> SubjectRecord:
    if len(sample.subjects) != 1:
        raise ValueError(
            f"diptych sources must be single-subject samples; the sample on manifest line {sample.line} "
            f"(target {sample.target!r}) has {len(sample.subjects)} subjects"
        )
    return sample.subjects[0]


def _subject_mask(sample: SampleRecord, source_root: Path, target_shape: tuple[int, ...]) -> np.ndarray:
    mask = read_mask(source_root / sample.subjects[0].mask)
    if mask.shape != target_shape[:2]:
        raise ValueError(
            f"manifest line {sample.line}: subjects[0].mask {sample.subjects[0].mask!r} is "
            f"{mask.shape[1]}x{mask.shape[0]}, expected the target size {target_shape[1]}x{target_shape[0]}"
        )
    return mask


def _relative_to(out_dir: Path, source_root: Path, path: str | None) -> str | None:
    """A source-relative path rewritten relative to ``out_dir`` (the file itself stays where it is)."""
    if path is None:
        return None
    return Path(os.path.relpath(source_root / path, out_dir)).as_posix()


def build_diptych_manifest(
    samples: Sequence[SampleRecord],
    source_root: Path,
    out_dir: Path,
    pairing: Literal["random", "same_category"],
    count: int,
    seed: int,
) -> Path:
    """Write ``count`` MUSAR diptych samples built from single-subject ``samples`` (paths relative to
    ``source_root``) into ``out_dir`` and return the manifest's path.

    Each diptych (Sec. 3.2.1): target = [left target | right target resized (bilinear) to the left's
    height and width]; subjects = [left subject, right subject with caption another_caption(caption)], each
    mask placed in its own half (the right one resized nearest) with zeros in the other half; prompt =
    diptych_prompt(left prompt, right prompt, right caption). References are not copied: their paths are
    rewritten relative to ``out_dir``. Pairs are drawn by draw_diptych_pairs with default_rng(seed).
    """
    source_root, out_dir = Path(source_root), Path(out_dir)
    sources = [_single_subject(sample) for sample in samples]
    pairs = draw_diptych_pairs([subject.category for subject in sources], pairing, count, np.random.default_rng(seed))
    records = []
    for number, (left_index, right_index) in enumerate(pairs):
        left, right = samples[left_index], samples[right_index]
        left_pixels = read_image(source_root / left.target)
        height, width = left_pixels.shape[:2]
        right_pixels = read_image(source_root / right.target)
        left_mask = _subject_mask(left, source_root, left_pixels.shape)
        right_mask = resize_mask(_subject_mask(right, source_root, right_pixels.shape), width, height)
        if not right_mask.any():
            raise ValueError(
                f"manifest line {right.line}: subjects[0].mask {right.subjects[0].mask!r} vanishes when its "
                f"target is resized to {width}x{height} for a diptych with line {left.line}; drop the sample "
                f"or give it a larger mask"
            )
        empty = np.zeros((height, width), dtype=bool)
        target = f"targets/{number:05d}.png"
        masks = (f"masks/{number:05d}-0.png", f"masks/{number:05d}-1.png")
        save_rgb(np.concatenate([left_pixels, resize_rgb(right_pixels, width, height)], axis=1), out_dir / target)
        save_mask(np.concatenate([left_mask, empty], axis=1), out_dir / masks[0])
        save_mask(np.concatenate([empty, right_mask], axis=1), out_dir / masks[1])
        left_subject, right_subject = sources[left_index], sources[right_index]
        prompt, right_caption = diptych_prompt(left.prompt, right.prompt, right_subject.caption)
        subjects = (
            SubjectRecord(
                _relative_to(out_dir, source_root, left_subject.reference),
                left_subject.category,
                left_subject.caption,
                masks[0],
                _relative_to(out_dir, source_root, left_subject.reference_mask),
            ),
            SubjectRecord(
                _relative_to(out_dir, source_root, right_subject.reference),
                right_subject.category,
                right_caption,
                masks[1],
                _relative_to(out_dir, source_root, right_subject.reference_mask),
            ),
        )
        records.append(SampleRecord(target, prompt, subjects))
    return write_manifest(records, out_dir / MANIFEST_NAME)


