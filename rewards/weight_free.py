"""Rewards that need no model weights: cheap, deterministic, CPU-only, for offline runs and the quickstart.

- JPEG (in)compressibility (DDPO, Black et al. 2023): the size in kB of the image saved as JPEG at a
  fixed quality; compressibility = -size, incompressibility = +size. A slow signal (smooth images
  compress well), kept because it is the classic benchmark task.
- Colour target: R = -mean_{pixels, channels} |x / 255 - c| for a target colour c in [0, 1]^3, in
  [-1, 0]. Every pixel moves it, so a policy learns it in minutes on a tiny model.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rewards.config import ColourTargetConfig, JpegConfig
from rewards.types import ScoreBatch


def jpeg_size_kb(image: np.ndarray, quality: int) -> float:
    """Size in kB (1000 bytes) of the (H, W, 3) uint8 image encoded as JPEG at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def colour_distance(image: np.ndarray, target_rgb: np.ndarray) -> float:
    """mean_{h, w, c} |image[h, w, c] / 255 - target_rgb[c]|; image (H, W, 3) uint8, target (3,) in [0, 1]."""
    pixels = image.astype(np.float32) / 255.0  # (H, W, 3)
    return float(np.abs(pixels - target_rgb.astype(np.float32)).mean())


class JpegSizeScorer:
    """sign * JPEG size in kB: ``sign=-1`` is compressibility, ``sign=+1`` incompressibility."""

    reads_reference_images = False

    def __init__(self, name: str, sign: float, cfg: JpegConfig):
        self.name = name
        self.sign = sign
        self.quality = cfg.quality

    def score(self, batch: ScoreBatch) -> np.ndarray:
        return np.array([self.sign * jpeg_size_kb(image, self.quality) for image in batch.images])


class ColourTargetScorer:
    """-colour_distance(image, target): 0 for an image entirely of the target colour."""

    reads_reference_images = False

    name = "colour_target"

    def __init__(self, cfg: ColourTargetConfig):
        self.target = np.asarray(cfg.rgb, dtype=np.float64)

    def score(self, batch: ScoreBatch) -> np.ndarray:
        return np.array([-colour_distance(image, self.target) for image in batch.images])
