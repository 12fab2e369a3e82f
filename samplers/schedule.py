"""Flow-matching noise schedules (FLUX convention: x_t = (1 - t) x0 + t eps, t = 1 is pure noise).

A schedule is a 1-D fp32 tensor of T + 1 sigmas, decreasing from 1 to a final 0; step i goes from
sigmas[i] to sigmas[i + 1]. These match diffusers' FlowMatchEulerDiscreteScheduler exactly for the same
settings (tests/test_schedule.py checks it).
"""

from __future__ import annotations

import math

import torch


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift mu: linear in the number of image tokens, from ``base_shift``
    at ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` tokens (extrapolated outside)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def exponential_time_shift(t: torch.Tensor, mu: float, power: float = 1.0) -> torch.Tensor:
    """t' = e^mu / (e^mu + (1/t - 1)^power) (FLUX's dynamic shift; t = 1 stays 1)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** power)


def static_time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t) (SD3-style constant shift; s = 1 is the identity)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flux_sigmas(
    num_steps: int,
    image_seq_len: int | None = None,
    *,
    shift: float | None = None,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> torch.Tensor:
    """The sampling schedule, shape (num_steps + 1,), fp32.

    Base grid linspace(1, 1/T, T) (as diffusers' FluxPipeline builds it), then
    - ``image_seq_len`` given: FLUX's dynamic exponential shift with mu = calculate_shift(image_seq_len);
    - ``shift`` given instead: the static shift s t / (1 + (s - 1) t);
    - neither: no shift.
    A final sigma of 0 is appended.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if image_seq_len is not None and shift is not None:
        raise ValueError("give either image_seq_len (dynamic shift) or shift (static shift), not both")
    # float64 grid then fp32, the same rounding path as diffusers (numpy linspace -> float32).
    grid = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).to(torch.float32)
    if image_seq_len is not None:
        mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        grid = exponential_time_shift(grid, mu)
    elif shift is not None:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        grid = static_time_shift(grid, shift)
    return torch.cat([grid.to(torch.float32), torch.zeros(1)])


def compress_schedule(sigmas: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Keep about ``keep_fraction`` of the steps of ``sigmas`` (MixGRPO-Flash's compressed ODE tail).

    Returns a sub-schedule that always keeps the first and the last sigma; the kept interior points are
    evenly spaced in index. keep_fraction = 1 returns the schedule unchanged; at least one step remains.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    num_steps = sigmas.numel() - 1
    if num_steps <= 1 or keep_fraction == 1.0:
        return sigmas
    kept_steps = max(1, round(keep_fraction * num_steps))
    index = torch.linspace(0, num_steps, kept_steps + 1, dtype=torch.float64).round().long()
    return sigmas[torch.unique(index)]
