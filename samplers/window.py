"""Which sampling steps run as SDE steps (and are trained on) at a given training iteration.

MultiCrafter Algorithm 1 (after MixGRPO): T steps, window W(l) = [l, l + w), SDE inside and ODE outside;
l starts at 0 and after every tau iterations l <- min(l + s, T - w). Written as a pure function of the
0-based global iteration m,

    l(m) = min(floor(m / tau) * s, T - w),

so every worker computes the same window and a resumed run restores it from its iteration. The window
always has exactly w steps: it never shrinks and never empties at the end of the schedule.
"""

from __future__ import annotations

import hashlib

import torch


def _check(num_steps: int, size: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 1 <= size <= num_steps:
        raise ValueError(f"window size must be in [1, num_steps={num_steps}], got {size}")


def window_start(iteration: int, num_steps: int, size: int, shift_interval: int, stride: int) -> int:
    """l(m) = min(floor(m / tau) * s, T - w) for the 0-based global iteration m."""
    _check(num_steps, size)
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if shift_interval < 1:
        raise ValueError(f"shift_interval (tau) must be >= 1, got {shift_interval}")
    if stride < 0:
        raise ValueError(f"stride (s) must be >= 0, got {stride}")
    return min((iteration // shift_interval) * stride, num_steps - size)


def window_at(iteration: int, num_steps: int, size: int, shift_interval: int, stride: int) -> list[int]:
    """Step indices [l, l + size) of the sliding SDE window at the 0-based global iteration."""
    start = window_start(iteration, num_steps, size, shift_interval, stride)
    return list(range(start, start + size))


def random_window_at(seed: int, iteration: int, num_steps: int, size: int) -> list[int]:
    """A window of ``size`` consecutive steps at a start drawn uniformly from [0, T - w], determined only
    by (seed, iteration): every worker and every resume agrees on it."""
    _check(num_steps, size)
    digest = hashlib.blake2b(f"window:{seed}:{iteration}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    start = int(torch.randint(0, num_steps - size + 1, (1,), generator=generator))
    return list(range(start, start + size))
