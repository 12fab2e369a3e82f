"""What every manifest builder shares: writing RGB images and masks as PNG, resizing them, and the
manifest's file name."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

MANIFEST_NAME = "manifest.jsonl"


def save_rgb(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB").save(path)


def save_mask(mask: np.ndarray, path: Path) -> None:
    """A bool mask as a grey-scale PNG, 255 inside and 0 outside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)


def resize_rgb(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of uint8 (H, W, 3) pixels to (height, width, 3)."""
    return np.asarray(Image.fromarray(pixels, "RGB").resize((width, height), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (nearest keeps it binary without a threshold)."""
    resized = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def join_captions(captions: Sequence[str]) -> str:
    """"a dog", "a dog and a cat", "a dog, a cat and a person"."""
    if len(captions) == 1:
        return captions[0]
    return ", ".join(captions[:-1]) + " and " + captions[-1]

