"""Offline synthetic subjects and scenes, so every stage runs with no external data.

A subject is a coloured shape ("a red circle"): its reference image is the shape alone on white, its
category is the shape. A scene places several subjects on a white canvas, larger ones first so that
smaller ones are drawn on top (MS-CustomNet's layout rule), and returns each subject's visible mask.
Everything is determined by the numpy Generator passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
    "cyan": (30, 190, 200),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ShapeSubject:
    shape: str
    colour: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {', '.join(COLOURS)}, got {self.colour!r}")

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=fill)


def render_reference(subject: ShapeSubject, size: int, margin: float = 0.1) -> np.ndarray:
    """The subject alone, centred on white: uint8 (size, size, 3)."""
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    pad = int(round(margin * size))
    _draw(ImageDraw.Draw(canvas), subject.shape, (pad, pad, size - 1 - pad, size - 1 - pad), subject.rgb)
    return np.asarray(canvas)


def sample_subjects(rng: np.random.Generator, count: int) -> list[ShapeSubject]:
    """``count`` subjects with distinct colours and distinct shapes where possible (so captions differ)."""
    if not 1 <= count <= len(COLOURS):
        raise ValueError(f"count must be in [1, {len(COLOURS)}], got {count}")
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count, replace=count > len(SHAPES))
    return [ShapeSubject(str(s), str(c)) for s, c in zip(shapes, colours)]


def scene_prompt(subjects: Sequence[ShapeSubject]) -> str:
    """"a red circle, a blue square and a green triangle on a white background"."""
    captions = [s.caption for s in subjects]
    listed = captions[0] if len(captions) == 1 else ", ".join(captions[:-1]) + " and " + captions[-1]
    return f"{listed} on a white background"


def compose_scene(
    subjects: Sequence[ShapeSubject], size: int, rng: np.random.Generator, min_scale: float = 0.25, max_scale: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Place the subjects at random sizes (a fraction of ``size`` in [min_scale, max_scale]) and positions.

    Returns the image, uint8 (size, size, 3), and the visible masks, bool (N, size, size), in the order of
    ``subjects``. Larger subjects are drawn first so smaller ones stay visible on top; a mask is what is
    left of a subject after the subjects drawn over it.
    """
    sides = (rng.uniform(min_scale, max_scale, size=len(subjects)) * size).astype(int).clip(2, size)
    corners = [(int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))) for side in sides]
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    owner = Image.new("L", (size, size), 0)  # 1 + index of the subject visible at each pixel, 0 = background
    owner_draw = ImageDraw.Draw(owner)
    for index in np.argsort(-sides, kind="stable"):
        x, y = corners[index]
        box = (x, y, x + int(sides[index]) - 1, y + int(sides[index]) - 1)
        _draw(draw, subjects[index].shape, box, subjects[index].rgb)
        _draw(owner_draw, subjects[index].shape, box, int(index) + 1)
    owner_map = np.asarray(owner)
    masks = np.stack([owner_map == i + 1 for i in range(len(subjects))])
    return np.asarray(canvas), masks
