"""Batches for the supervised warm-start stages: manifest samples loaded as tensors, grouped into
buckets by subject count and target resolution (the position ids and the token layout are shared by
every sample of a batch), epoch after epoch in a seeded order that a checkpoint can resume.

Targets keep their aspect ratio: the shorter side is scaled to ``target_size`` and both sides are rounded
to a multiple of ``size_multiple`` (16 on FLUX: 8 pixels per latent cell x 2x2 packing). References are
resized to ``reference_size`` squares (MultiCrafter: 512 px targets, 320 px references).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rl_align.sft.manifest import SampleRecord, read_image, read_mask
from samplers.noise import key_seed


@dataclass(frozen=True)
class SyntheticDataConfig:
    """The offline coloured-shape dataset written into the run folder when ``data.manifest`` is empty."""

    samples: int = 64
    min_subjects: int = 1
    max_subjects: int = 2
    image_size: int = 64
    reference_size: int = 32

    def __post_init__(self) -> None:
        if self.samples < 1 or not 1 <= self.min_subjects <= self.max_subjects:
            raise ValueError(f"need samples >= 1 and 1 <= min_subjects <= max_subjects, got {self.samples}, {self.min_subjects}, {self.max_subjects}")


@dataclass(frozen=True)
class SFTDataConfig:
    manifest: str = ""  # JSON Lines manifest (rl_align/sft/manifest.py); empty: generate the synthetic set
    # Allowed subject categories; a manifest line with another category is refused. Empty allows any.
    categories: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
    target_size: int = 64  # shorter side of the targets in pixels (MultiCrafter: 512)
    reference_size: int = 32  # side of the square references in pixels (MultiCrafter: 320)
    size_multiple: int = 16  # target sides are rounded to a multiple of this (FLUX: 16)
    batch_size: int = 4
    # Categories whose reference is cropped to its reference_mask's bounding box before resizing
    # (MultiCrafter: the face crop is the reference for humans).
    crop_reference_categories: tuple[str, ...] = ("face",)
    crop_margin: float = 0.1  # extra border around that box, as a fraction of its longer side
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def __post_init__(self) -> None:
        if min(self.target_size, self.reference_size, self.size_multiple, self.batch_size) < 1:
            raise ValueError("target_size, reference_size, size_multiple and batch_size must be >= 1")
        if self.target_size % self.size_multiple or self.reference_size % self.size_multiple:
            raise ValueError(
                f"target_size {self.target_size} and reference_size {self.reference_size} must be multiples of size_multiple {self.size_multiple}"
            )


class SFTBatch(NamedTuple):
    """B samples with the same subject count R and target size H x W."""

    targets: torch.Tensor  # (B, 3, H, W) in [0, 1]
    references: tuple[torch.Tensor, ...]  # R tensors (B, 3, r, r) in [0, 1], in subject order
    masks: torch.Tensor  # (B, R, H, W) in {0, 1}: each subject's region in the target
    prompts: tuple[str, ...]  # (B,)
    captions: tuple[tuple[str, ...], ...]  # (B, R)
    categories: tuple[tuple[str, ...], ...]  # (B, R)
    lines: tuple[int, ...]  # (B,) manifest line of each sample, for messages

    def select(self, indices: Sequence[int]) -> "SFTBatch":
        """The sub-batch of the given sample indices."""
        index = torch.tensor(list(indices), dtype=torch.long)
        return SFTBatch(
            self.targets[index], tuple(r[index] for r in self.references), self.masks[index],
            tuple(self.prompts[i] for i in indices), tuple(self.captions[i] for i in indices),
            tuple(self.categories[i] for i in indices), tuple(self.lines[i] for i in indices),
        )


class PlannedSample(NamedTuple):
    sample: int  # index into the stream's samples
    subjects: tuple[int, ...]  # which of its subjects (all, or a curriculum subset), in subject order


def bucket_size(width: int, height: int, target_size: int, multiple: int) -> tuple[int, int]:
    """(H, W) of a target: shorter side scaled to target_size, each side rounded to a multiple (>= one)."""
    scale = target_size / min(width, height)
    return tuple(max(multiple, int(round(side * scale / multiple)) * multiple) for side in (height, width))


def subject_count_limit(epoch: int, epochs: int, k_min: int, k_max: int, gamma: float) -> int:
    """MS-CustomNet's curriculum on subject quantity (Eq. 15):
    K(e) = max(K_min, K_min + floor((e / E)^gamma (K_max - K_min))).

    ``epoch`` is the paper's e, 1-based: e = 1..E, so the last epoch (e = E) trains K_max. With E = 10,
    K 2 -> 5 and gamma 1 the ten epochs get [2, 2, 2, 3, 3, 3, 4, 4, 4, 5]. The formula as it stands:
    callers cap e at E (``curriculum_schedule``)."""
    if epochs < 1 or not 1 <= k_min <= k_max or gamma <= 0:
        raise ValueError(f"need epochs >= 1, 1 <= k_min <= k_max and gamma > 0, got {epochs}, {k_min}, {k_max}, {gamma}")
    return max(k_min, k_min + math.floor((epoch / epochs) ** gamma * (k_max - k_min)))


def curriculum_schedule(epochs: int, k_min: int, k_max: int, gamma: float) -> Callable[[int], int]:
    """The subject limit of each stream epoch (0-based, as ``BatchStream.epoch``) for a curriculum over
    ``epochs`` epochs: stream epoch i is the paper's e = i + 1; epochs past E stay at K_max."""
    subject_count_limit(1, epochs, k_min, k_max, gamma)  # refuses bad settings now, not at the first epoch
    return lambda epoch: subject_count_limit(min(epoch + 1, epochs), epochs, k_min, k_max, gamma)


def epoch_steps(steps: int, world: int, batches: Callable[[int], int]) -> list[int]:
    """The steps each epoch lasts, for the epochs that ``steps`` steps touch, when epoch e (0-based) has
    ``batches(e)`` batches shared by ``world`` processes: each takes every world-th batch (``BatchStream``),
    so rank 0, whose share is the largest, takes ceil(batches(e) / world) steps. The last epoch may be
    left unfinished."""
    lengths: list[int] = []
    while sum(lengths) < steps:
        count = batches(len(lengths))
        if count < 1:
            raise ValueError(f"epoch {len(lengths)} has no batches")
        lengths.append(math.ceil(count / world))
    return lengths


def curriculum_epochs(
    steps: int,
    world: int,
    batches: Callable[[int, int | None], int],
    schedule: Callable[[int], Callable[[int], int]],
    max_rounds: int = 32,
) -> int:
    """E of the subject curriculum: the number of epochs that ``steps`` steps of rank 0 traverse under
    ``world`` processes, when epoch e has ``batches(e, limit)`` batches with at most ``limit`` subjects per
    sample (None: no limit) and the limits are ``schedule(E)`` (stream epoch -> K).

    The limits change the buckets and so the epochs' lengths, so E is a fixed point: start from the
    epochs without a limit, take the limits of that E, count the epochs they make, repeat until E does
    not change. A smaller limit merges buckets, so an epoch has no more batches (as BatchStream plans
    them); a larger E lowers every epoch's limit, so its run traverses at least as many epochs: from
    the run without a limit the rounds only grow E, and they stop. Should ``batches`` break that (no
    fixed point within ``max_rounds``, or a cycle), the answer is the largest E tried whose run traverses
    at least E epochs (the smallest E of a cycle): its last epochs train K_max."""
    traversed: dict[int, int] = {}  # E tried -> epochs its limits make
    epochs = len(epoch_steps(steps, world, lambda epoch: batches(epoch, None)))
    while epochs not in traversed and len(traversed) < max_rounds:
        limit = schedule(epochs)
        traversed[epochs] = len(epoch_steps(steps, world, lambda epoch: batches(epoch, limit(epoch))))  # noqa: B023
        if traversed[epochs] == epochs:
            return epochs
        epochs = traversed[epochs]
    reaching = [tried for tried, made in traversed.items() if made >= tried]
    return max(reaching) if reaching else min(traversed)


class BatchStream:
    """Endless batches over ``samples``, one epoch (a seeded shuffle of the buckets' batches) after
    another. ``subject_limit(epoch)`` (MS-CustomNet Eq. 16) keeps a seeded random subset of at most that
    many subjects of a sample, in their original order. Data-parallel process ``rank`` of ``world`` takes
    every world-th batch of each epoch's plan, starting at its rank, so the processes share each epoch
    without overlap. The position (epoch, batch) is the whole state."""

    def __init__(
        self,
        samples: Sequence[SampleRecord],
        root: Path,
        cfg: SFTDataConfig,
        seed: int,
        subject_limit: Callable[[int], int] | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        if not samples:
            raise ValueError("a batch stream needs at least one sample")
        self.samples, self.root, self.cfg, self.seed = list(samples), Path(root), cfg, seed
        self.subject_limit, self.rank, self.world = subject_limit, rank, world
        self.sizes = [bucket_size(*_target_size(s, self.root), cfg.target_size, cfg.size_multiple) for s in self.samples]
        self.epoch, self.position = 0, 0
        self._plan = self._rank_plan(0)

    def set_subject_limit(self, subject_limit: Callable[[int], int] | None) -> None:
        """Set the curriculum (``subject_limit``) of a stream that has not yet given a batch; the trainer
        sizes it from the stream's own plans (``curriculum_epochs``)."""
        if self.state() != {"epoch": 0, "position": 0}:
            raise RuntimeError("the subject limit of a batch stream is set before its first batch")
        self.subject_limit = subject_limit
        self._plan = self._rank_plan(0)

    def _rank_plan(self, epoch: int) -> list[list[PlannedSample]]:
        plan = self.plan(epoch)
        if len(plan) < self.world:
            raise ValueError(
                f"{len(self.samples)} samples make {len(plan)} batches of up to {self.cfg.batch_size} per epoch, fewer than the "
                f"{self.world} data-parallel processes: use more samples or a smaller data.batch_size"
            )
        return plan[self.rank :: self.world]

    def plan(self, epoch: int) -> list[list[PlannedSample]]:
        """The batches of one epoch (all processes'), under the stream's subject limit."""
        return self.plan_with_limit(epoch, self.subject_limit(epoch) if self.subject_limit else None)

    def plan_with_limit(self, epoch: int, limit: int | None) -> list[list[PlannedSample]]:
        """The batches of one epoch when a sample keeps at most ``limit`` subjects (None: all): samples
        grouped by (subject count, target size), each bucket shuffled and cut into batches of batch_size
        (a bucket's last batch may be smaller; no sample is dropped), then the batches shuffled."""
        rng = np.random.default_rng(key_seed("sft-epoch", self.seed, epoch))
        buckets: dict[tuple[int, int, int], list[PlannedSample]] = {}
        for index in rng.permutation(len(self.samples)):
            count = len(self.samples[index].subjects)
            subjects = tuple(range(count))
            if limit is not None and count > limit:
                subjects = tuple(sorted(rng.choice(count, size=limit, replace=False).tolist()))
            key = (len(subjects), *self.sizes[index])
            buckets.setdefault(key, []).append(PlannedSample(int(index), subjects))
        batches = [
            members[i : i + self.cfg.batch_size]
            for key in sorted(buckets)
            for members in [buckets[key]]
            for i in range(0, len(members), self.cfg.batch_size)
        ]
        return [batches[i] for i in rng.permutation(len(batches))]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._plan = self._rank_plan(self.epoch)

    def next(self) -> SFTBatch:
        if self.position >= len(self._plan):
            self.epoch, self.position = self.epoch + 1, 0
            self._plan = self._rank_plan(self.epoch)
        planned = self._plan[self.position]
        self.position += 1
        return self.load(planned)

    def load(self, planned: Sequence[PlannedSample]) -> SFTBatch:
        """Read and resize the planned samples (all of one bucket) into a batch."""
        examples = [self._load_sample(p) for p in planned]
        return SFTBatch(
            torch.stack([e[0] for e in examples]),
            tuple(torch.stack(refs) for refs in zip(*(e[1] for e in examples))),
            torch.stack([e[2] for e in examples]),
            *(tuple(e[i] for e in examples) for i in (3, 4, 5, 6)),
        )

    def _load_sample(self, planned: PlannedSample):
        record = self.samples[planned.sample]
        height, width = self.sizes[planned.sample]
        target = _resize(_to_tensor(read_image(self.root / record.target)), (height, width))
        subjects = [record.subjects[i] for i in planned.subjects]
        masks = torch.stack([
            F.interpolate(torch.from_numpy(read_mask(self.root / s.mask)).float()[None, None], size=(height, width), mode="nearest")[0, 0]
            for s in subjects
        ])
        references = []
        for s in subjects:
            image = read_image(self.root / s.reference)
            if s.category in self.cfg.crop_reference_categories and s.reference_mask is not None:
                image = crop_to_mask(image, read_mask(self.root / s.reference_mask), self.cfg.crop_margin)
            references.append(_resize(_to_tensor(image), (self.cfg.reference_size, self.cfg.reference_size)))
        return (
            target, references, masks, record.prompt, tuple(s.caption for s in subjects),
            tuple(s.category for s in subjects), record.line,
        )


def _target_size(sample: SampleRecord, root: Path) -> tuple[int, int]:
    """(width, height) of a sample's target: from the manifest check when it ran, else from the file."""
    if sample.target_size is not None:
        return sample.target_size
    with Image.open(root / sample.target) as image:
        return image.size


def crop_to_mask(image: np.ndarray, mask: np.ndarray, margin: float) -> np.ndarray:
    """The square crop around the mask's bounding box, grown by ``margin`` x its longer side and clipped
    to the image (the face crop MultiCrafter uses as a human's reference). image (H, W, 3), mask (H, W)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = int(round(max(bottom - top, right - left) * (1 + 2 * margin)))
    centre_row, centre_col = (top + bottom) // 2, (left + right) // 2
    top = int(np.clip(centre_row - side // 2, 0, max(0, image.shape[0] - side)))
    left = int(np.clip(centre_col - side // 2, 0, max(0, image.shape[1] - side)))
    return image[top : top + side, left : left + side]


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.tensor(image).permute(2, 0, 1).float() / 255.0  # copies: PIL arrays are read-only


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
