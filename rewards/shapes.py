"""Weight-free object subjects of the ``id`` component ("shapes" backend): flat-coloured shapes on a plain
background, as in the embedded synthetic data, located and described with numpy, scipy and PIL only.

Locating (``locate_subjects``); colour distances are Euclidean in sRGB with channels in [0, 1]:
1. the background colour is the per-channel median of the border pixels; when the border is noisy
   (its median distance from that colour exceeds ``noise_threshold``) a median filter
   (``median_size``) removes the pixel noise, keeping edges, and the background is estimated again;
2. a pixel farther from the background than ``foreground_threshold`` is foreground;
3. the subject colours are the mean-shift modes of the foreground colours (flat kernel of radius
   ``colour_radius``), seeded densest first. Two modes on one ray from the background (one lies,
   within the radius, on the segment from the background to the other) are one subject: the paler is
   a blend with the background, i.e. the anti-aliased or blurred rim, or the core of a subject too
   small to keep its full colour through a blur, and the more saturated one stands for both;
4. each foreground pixel joins the colour whose background segment it is closest to, or none if that is
   farther than twice the radius (stray noise colours) or if the pixel is less than half that colour
   (the outer half of a rim: a blurred subject keeps its half-intensity outline, not a swollen one);
5. the 8-connected components of each colour smaller than ``min_area_fraction`` of the image are dropped.
So one subject is one candidate however noisy, and two subjects are two candidates whether they touch
(different colours) or not (any colours). A light tint drawn next to its own full colour (pink beside
red) is taken for a rim and merged: the synthetic palette has no such pair.

Descriptor of a candidate (and of a reference: its largest candidate), ``3 + shape_grid**2`` numbers:
- colour: the median CIELAB colour of the mask's pixels (the median ignores noise and rim blends);
- shape: the mask with its holes filled (a smaller subject drawn on top leaves one) cropped to its
  bounding box, padded to a square about its centre (the aspect ratio counts), area-averaged to
  ``shape_grid`` x ``shape_grid``: invariant to translation and scale.

Similarity, in [-1, 1] (``colour_weight + shape_weight = 1``):
    S = colour_weight * s_colour + shape_weight * s_shape
    s_colour = clip(1 - dE / colour_scale, -1, 1)                  dE: CIE76 distance of the colours
    s_shape = clip((IoU - shape_floor) / (1 - shape_floor), -1, 1)  IoU = sum min(g, g') / sum max(g, g')
With the defaults, against a red circle reference (measured on 22 px shapes in a 64 px scene): a red
circle 0.96 (the reference itself 1), a red square 0.71, diamond 0.57, triangle 0.41; an orange circle
0.44, a blue circle -0.04, a blue triangle -0.60. Pairs below 0 are left unmatched by the Hungarian step
of ``rewards.matching``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from rewards.config import ShapesConfig
from rewards.types import InputError, ReferenceSubject, ScoreBatch

# Colours sampled for the O(m^2) density of the mean-shift seeds; the modes need no more.
MAX_COLOUR_SAMPLES = 1024
MEAN_SHIFT_STEPS = 30

# sRGB (D65) -> CIE XYZ, and the D65 white point.
_SRGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


class LocatedSubjects(NamedTuple):
    boxes: np.ndarray  # (K, 4) int x0, y0, x1, y1 in pixels, x1 and y1 exclusive: image[y0:y1, x0:x1]
    masks: np.ndarray  # (K, H, W) bool, the pixels of each candidate; largest first


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB colours: (..., 3) in [0, 1] -> (..., 3) with L in [0, 100]."""
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def border_pixels(image: np.ndarray) -> np.ndarray:
    """The outermost rows and columns of an (H, W, 3) image: (2W + 2H, 3)."""
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def border_colour(image: np.ndarray) -> np.ndarray:
    """Per-channel median of the border pixels: (H, W, 3) -> (3,). Subjects may touch the border; the
    median holds while most of the border is background."""
    return np.median(border_pixels(image), axis=0)


def border_noise(image: np.ndarray, background: np.ndarray) -> float:
    """Median distance of the border pixels of an (H, W, 3) image from the background colour (3,)."""
    return float(np.median(np.linalg.norm(border_pixels(image) - background, axis=1)))


def blend_fit(colours: np.ndarray, ends: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How each colour fits a blend ``(1 - t) start + t end`` of the background ``start`` (3,) with each
    subject colour: colours (n, 3), ends (C, 3) -> distance to the segment (n, C) and the fraction t
    in [0, 1] of its nearest point (n, C)."""
    direction = ends - start  # (C, 3)
    offset = colours - start  # (n, 3)
    length2 = np.maximum((direction**2).sum(1), 1e-12)  # (C,)
    along = offset @ direction.T  # (n, C)
    t = np.clip(along / length2, 0.0, 1.0)
    # |offset - t direction|^2 expanded, so that no (n, C, 3) array is formed on a large image.
    squared = (offset**2).sum(1, keepdims=True) - 2.0 * t * along + t**2 * length2
    return np.sqrt(np.maximum(squared, 0.0)), t


def same_ray(colour: np.ndarray, others: np.ndarray, background: np.ndarray, radius: float) -> np.ndarray:
    """Whether ``colour`` (3,) and each of ``others`` (C, 3) lie on one ray from the background (3,),
    i.e. either is within ``radius`` of the blends of the background with the other: -> (C,) bool."""
    paler = blend_fit(colour[None], others, background)[0][0]  # (C,)
    deeper = blend_fit(others, colour[None], background)[0][:, 0]  # (C,)
    return np.minimum(paler, deeper) <= radius


def _mean_shift(points: np.ndarray, start: np.ndarray, radius: float) -> np.ndarray:
    """The mode reached from ``start`` by flat-kernel mean shift over points (m, 3) -> (3,). The mean of
    the points within the radius always has one of them within the radius, so no step is empty."""
    centre = start
    for _ in range(MEAN_SHIFT_STEPS):
        shifted = points[np.linalg.norm(points - centre, axis=1) <= radius].mean(0)
        if np.linalg.norm(shifted - centre) < 1e-3 * radius:
            return shifted
        centre = shifted
    return centre


def colour_modes(colours: np.ndarray, background: np.ndarray, radius: float, min_count: float) -> np.ndarray:
    """The subject colours among foreground colours (n, 3) -> (C, 3), in the order their first mode was
    found (densest first): mean-shift modes holding at least ``min_count`` colours within ``radius``,
    one per ray from the background (3,), the most saturated."""
    step = -(-len(colours) // MAX_COLOUR_SAMPLES)
    sample = colours[::step]  # (m, 3)
    min_sampled = min_count * len(sample) / len(colours)
    squared = (sample**2).sum(1)
    density = (squared[:, None] + squared[None, :] - 2.0 * sample @ sample.T <= radius**2).sum(1)  # (m,)
    covered = np.zeros(len(sample), dtype=bool)
    modes: list[np.ndarray] = []
    for seed in np.argsort(-density, kind="stable"):
        if density[seed] < min_sampled:
            break
        if covered[seed]:
            continue
        mode = _mean_shift(sample, sample[seed], radius)
        near = np.linalg.norm(sample - mode, axis=1) <= radius  # (m,)
        # Seeds this close to the seed or to its mode climb to the same mode: not tried again.
        covered |= near | (np.linalg.norm(sample - sample[seed], axis=1) <= radius)
        if near.sum() < min_sampled:
            continue
        same = same_ray(mode, np.stack(modes), background, radius) if modes else np.zeros(0, dtype=bool)
        if not same.any():
            modes.append(mode)
        else:
            first = int(np.flatnonzero(same)[0])
            if np.linalg.norm(mode - background) > np.linalg.norm(modes[first] - background):
                modes[first] = mode
        covered |= blend_fit(sample, mode[None], background)[0][:, 0] <= radius
    return np.stack(modes) if modes else np.zeros((0, 3))


def locate_subjects(image: np.ndarray, cfg: ShapesConfig) -> LocatedSubjects:
    """The subject candidates of an (H, W, 3) uint8 image (steps in the module docstring), largest
    first; none on a plain image."""
    height, width = image.shape[:2]
    pixels = image.astype(np.float64) / 255.0  # (H, W, 3)
    background = border_colour(pixels)
    if cfg.median_size > 1 and border_noise(pixels, background) > cfg.noise_threshold:
        size = (cfg.median_size, cfg.median_size, 1)
        pixels = ndimage.median_filter(image, size=size, mode="nearest").astype(np.float64) / 255.0
        background = border_colour(pixels)
    foreground = np.linalg.norm(pixels - background, axis=-1) > cfg.foreground_threshold  # (H, W)
    min_area = cfg.min_area_fraction * height * width
    empty = LocatedSubjects(np.zeros((0, 4), dtype=np.int64), np.zeros((0, height, width), dtype=bool))
    if foreground.sum() < min_area:
        return empty
    colours = pixels[foreground]  # (n, 3)
    modes = colour_modes(colours, background, cfg.colour_radius, min_area)  # (C, 3)
    if len(modes) == 0:
        return empty
    distance, fraction = blend_fit(colours, modes, background)  # (n, C) each
    best = distance.argmin(1)  # (n,)
    fits = (distance.min(1) <= 2 * cfg.colour_radius) & (fraction[np.arange(len(best)), best] >= 0.5)
    owner = np.full((height, width), -1)
    owner[foreground] = np.where(fits, best, -1)
    masks = []
    for c in range(len(modes)):
        labels, count = ndimage.label(owner == c, structure=np.ones((3, 3), dtype=bool))
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        masks.extend(labels == k for k in range(1, count + 1) if areas[k] >= min_area)
    if not masks:
        return empty
    masks.sort(key=lambda mask: -int(mask.sum()))  # stable: equal areas keep colour, then scan order
    stacked = np.stack(masks)  # (K, H, W)
    return LocatedSubjects(np.stack([mask_box(mask) for mask in stacked]), stacked)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """(4,) x0, y0, x1, y1 of a non-empty (H, W) mask, x1 and y1 exclusive."""
    rows, cols = ndimage.find_objects(mask.astype(np.int32))[0]
    return np.array([cols.start, rows.start, cols.stop, rows.stop], dtype=np.int64)


def shape_grid(mask: np.ndarray, grid: int) -> np.ndarray:
    """Occupancy of the (H, W) mask, holes filled, cropped to its box, padded to a square about its
    centre and area-averaged: -> (grid, grid) in [0, 1]."""
    x0, y0, x1, y1 = mask_box(mask)
    crop = ndimage.binary_fill_holes(mask[y0:y1, x0:x1]).astype(np.float32)  # (h, w)
    side = max(crop.shape)
    pad_y, pad_x = side - crop.shape[0], side - crop.shape[1]
    square = np.pad(crop, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)))
    return np.asarray(Image.fromarray(square).resize((grid, grid), Image.Resampling.BOX), dtype=np.float64)


def describe(image: np.ndarray, mask: np.ndarray, grid: int) -> np.ndarray:
    """[median L*a*b* of the mask's pixels, flattened shape grid]: (H, W, 3) uint8, (H, W) bool ->
    (3 + grid * grid,)."""
    colour = np.median(srgb_to_lab(image[mask].astype(np.float64) / 255.0), axis=0)  # (3,)
    return np.concatenate([colour, shape_grid(mask, grid).ravel()])


def shape_colour_similarity(refs: np.ndarray, candidates: np.ndarray, cfg: ShapesConfig) -> np.ndarray:
    """S = colour_weight * s_colour + shape_weight * s_shape (module docstring) of descriptors
    (N, 3 + G^2) and (M, 3 + G^2) -> (N, M) in [-1, 1]."""
    delta_e = np.linalg.norm(refs[:, None, :3] - candidates[None, :, :3], axis=-1)  # (N, M)
    s_colour = np.clip(1.0 - delta_e / cfg.colour_scale, -1.0, 1.0)
    a, b = refs[:, None, 3:], candidates[None, :, 3:]  # (N, 1, G^2), (1, M, G^2)
    iou = np.minimum(a, b).sum(-1) / np.maximum(np.maximum(a, b).sum(-1), 1e-12)  # (N, M)
    s_shape = np.clip((iou - cfg.shape_floor) / (1.0 - cfg.shape_floor), -1.0, 1.0)
    return cfg.colour_weight * s_colour + cfg.shape_weight * s_shape


class ShapeSubjectEmbedder:
    """The ``shapes`` object backend (a SubjectEmbedder of kind "object"). It needs no captions: every
    subject located in the image is a candidate, and the captions passed in are ignored."""

    kind = "object"

    def __init__(self, cfg: ShapesConfig):
        self.cfg = cfg

    def locate(self, image: np.ndarray) -> np.ndarray:
        """(K, 4) boxes x0, y0, x1, y1 (x1, y1 exclusive) of the candidates ``embed_candidates`` embeds,
        in the same order: for subject crops ``image[y0:y1, x0:x1]`` in evaluation."""
        return locate_subjects(image, self.cfg).boxes

    def embed_reference(self, subject: ReferenceSubject, where: str) -> np.ndarray:
        located = locate_subjects(subject.image, self.cfg)
        if len(located.masks) == 0:
            raise InputError(f"{where}.image", "no subject found in the reference image (it is one plain colour)")
        return describe(subject.image, located.masks[0], self.cfg.shape_grid)

    def embed_candidates(self, image: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        masks = locate_subjects(image, self.cfg).masks  # (K, H, W)
        descriptors = [describe(image, mask, self.cfg.shape_grid) for mask in masks]
        return np.stack(descriptors) if descriptors else np.zeros((0, 3 + self.cfg.shape_grid**2))

    def similarity(self, refs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return shape_colour_similarity(refs, candidates, self.cfg)


class SubjectCountScorer:
    """``subject_count``, a weight-free stand-in for the text term of Eq. 9 on the synthetic scenes: the
    prompt names N subjects (one per reference) and the image should show that many,
    R = clip(1 - |K - N| / max(N, 1), -1, 1) with K the subjects located (``locate_subjects``)."""

    name = "subject_count"
    reads_reference_images = False

    def __init__(self, cfg: ShapesConfig):
        self.cfg = cfg

    def score(self, batch: ScoreBatch) -> np.ndarray:
        scores = []
        for image, references in zip(batch.images, batch.references):
            found, named = len(locate_subjects(image, self.cfg).boxes), len(references)
            scores.append(float(np.clip(1.0 - abs(found - named) / max(named, 1), -1.0, 1.0)))
        return np.asarray(scores)


class BackgroundScorer:
    """``background``, a weight-free stand-in for the aesthetic term of Eq. 9: how clean the background
    is. Over the pixels outside every located subject, R = mean(1 - min(1, d / foreground_threshold)),
    with d the sRGB distance of a pixel from the named background colour (``background_rgb``): 1 for a
    clean background, 0 where every such pixel is as far off as a subject."""

    name = "background"
    reads_reference_images = False

    def __init__(self, cfg: ShapesConfig):
        self.cfg = cfg

    def score(self, batch: ScoreBatch) -> np.ndarray:
        target = np.asarray(self.cfg.background_rgb, dtype=np.float64)
        scores = []
        for image in batch.images:
            masks = locate_subjects(image, self.cfg).masks  # (K, H, W)
            outside = ~masks.any(axis=0) if len(masks) else np.ones(image.shape[:2], dtype=bool)
            pixels = image[outside].astype(np.float64) / 255.0  # (P, 3)
            if not len(pixels):
                scores.append(0.0)
                continue
            distance = np.linalg.norm(pixels - target, axis=1)
            scores.append(float(np.mean(1.0 - np.minimum(1.0, distance / self.cfg.foreground_threshold))))
        return np.asarray(scores)
