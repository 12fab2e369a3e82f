"""Reproducible noise keyed by what a sample is, never by which worker draws it.

Every draw comes from a fresh generator whose seed is a 63-bit hash of a key tuple such as
("init", seed, iteration, group). Drawing on the CPU and then moving to the target device gives the same
numbers on every device and for any batching of the samples across workers.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def key_seed(*key: object) -> int:
    """A 63-bit seed from a key tuple (blake2b), stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_normal(shape: Sequence[int], *key: object, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal fp32 noise of ``shape`` determined only by ``key``."""
    generator = torch.Generator().manual_seed(key_seed(*key))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def group_noise(seed: int, iteration: int, group: int, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The initial noise shared by all samples of one group (one prompt and reference set) at one
    iteration: a tensor of ``shape`` (one sample, no batch dim). Distinct (seed, iteration, group) give
    independent noise; the same triple always gives the same noise."""
    return keyed_normal(shape, "init", seed, iteration, group, device=device)


def sde_noise(
    seed: int, iteration: int, group: int, samples: Sequence[int], step: int, shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The SDE noise of each listed sample of a group at one sampling step: (len(samples), *shape).
    It is what makes the samples of a group differ, so it is keyed by the sample index too."""
    return torch.stack([keyed_normal(shape, "sde", seed, iteration, group, j, step) for j in samples]).to(device)
