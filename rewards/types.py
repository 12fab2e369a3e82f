"""Typed containers for a scoring batch and its results, and the scorer interface every reward follows.

A batch is B generated images (uint8 RGB, H x W x 3), their B prompts and, per image, the reference
subjects it should show (a reference image, its kind ``face`` | ``object`` and a caption). A scorer maps
a batch to B floats; the composite reward combines named scorers into one reward per image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, get_args

import numpy as np

SubjectKind = Literal["face", "object"]
SUBJECT_KINDS: tuple[str, ...] = get_args(SubjectKind)


class InputError(ValueError):
    """Bad scoring input. ``where`` names the field and index (``images[2]``, ``references[1][0].kind``)
    so a caller, or the server's 422 response, can point at the offending item."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def check_rgb_image(image: object, where: str) -> np.ndarray:
    """Return ``image`` if it is a uint8 (H, W, 3) array with H, W >= 1, else raise InputError naming ``where``."""
    if not isinstance(image, np.ndarray):
        raise InputError(where, f"expected a numpy uint8 array of shape (H, W, 3), got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise InputError(where, f"expected a uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    return image


@dataclass(frozen=True, eq=False)
class ReferenceSubject:
    """One subject an image should show: its reference image (uint8 RGB), kind and caption (the caption
    is the grounding phrase for objects, e.g. "a red backpack")."""

    image: np.ndarray
    kind: SubjectKind
    caption: str = ""

    def validate(self, where: str) -> None:
        check_rgb_image(self.image, f"{where}.image")
        if self.kind not in SUBJECT_KINDS:
            raise InputError(f"{where}.kind", f"expected one of {', '.join(SUBJECT_KINDS)}, got {self.kind!r}")
        if not isinstance(self.caption, str):
            raise InputError(f"{where}.caption", f"expected a string, got {type(self.caption).__name__}")

    def content_key(self) -> tuple[str, str]:
        """(kind, digest of the pixels): equal for the same reference shared by the images of a group,
        so its embedding is computed once per batch."""
        digest = hashlib.blake2b(self.image.tobytes(), digest_size=16)
        digest.update(str(self.image.shape).encode())
        return self.kind, digest.hexdigest()


@dataclass(frozen=True, eq=False)
class ScoreBatch:
    """B generated images with their prompts and per-image reference subjects (validated on creation)."""

    images: Sequence[np.ndarray]
    prompts: Sequence[str]
    references: Sequence[Sequence[ReferenceSubject]] = field(default=())

    def __post_init__(self) -> None:
        if not self.references:  # no subjects at all: text/aesthetic/weight-free rewards only
            object.__setattr__(self, "references", tuple(() for _ in self.images))
        for i, image in enumerate(self.images):
            check_rgb_image(image, f"images[{i}]")
        if len(self.prompts) != len(self.images):
            raise InputError("prompts", f"expected {len(self.images)} prompts (one per image), got {len(self.prompts)}")
        for i, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str):
                raise InputError(f"prompts[{i}]", f"expected a string, got {type(prompt).__name__}")
        if len(self.references) != len(self.images):
            raise InputError(
                "references", f"expected {len(self.images)} reference lists (one per image), got {len(self.references)}"
            )
        for i, subjects in enumerate(self.references):
            for j, subject in enumerate(subjects):
                if not isinstance(subject, ReferenceSubject):
                    raise InputError(
                        f"references[{i}][{j}]", f"expected a ReferenceSubject, got {type(subject).__name__}"
                    )
                subject.validate(f"references[{i}][{j}]")

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class RewardResult:
    """rewards: (B,) weighted sum; components: name -> (B,) unweighted component scores."""

    rewards: np.ndarray
    components: dict[str, np.ndarray]


class Scorer(Protocol):
    """One reward component: a batch of B images -> (B,) float64 scores (higher is better).

    ``reads_reference_images``: whether it looks at the reference subjects' pixels (the identity term);
    the server decodes a request's reference images only for a reward that reads them."""

    name: str
    reads_reference_images: bool

    def score(self, batch: ScoreBatch) -> np.ndarray: ...


class RewardModel(Protocol):
    """What a trainer calls: the in-process composite reward and the REST client both implement it."""

    def score(self, batch: ScoreBatch) -> RewardResult: ...


def reads_reference_images(model: object) -> bool:
    """Whether scoring with ``model`` (a scorer or a reward) reads the pixels of the reference images: its
    ``reads_reference_images`` attribute (every built-in scorer and the composite reward declare it); a
    model that does not declare it is taken to read them (the safe side: its references are decoded)."""
    declared = getattr(model, "reads_reference_images", True)
    return declared if isinstance(declared, bool) else True
