"""Flow-matching training math shared by the warm-start stages and the tiny base (FLUX convention,
t = 1 is noise): the noisy input and target of a sample, and the training-time distribution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class TimestepConfig:
    """Where on the flow x_t = (1 - t) x0 + t eps training looks."""

    sampling: Literal["uniform", "logit_normal"] = "logit_normal"  # logit-normal: SD3 / FLUX fine-tuning
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # t <- s t / (1 + (s - 1) t), towards noise for s > 1 (FLUX at 512 px: about 3)

    def __post_init__(self) -> None:
        if self.logit_std <= 0 or self.shift <= 0:
            raise ValueError(f"logit_std and shift must be > 0, got {self.logit_std}, {self.shift}")


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy input and the regression target of flow matching (FLUX convention, t = 1 is noise):
    x_t = (1 - t) x0 + t eps and v = eps - x0, so that an Euler step x_t + (t' - t) v lands on the same line.
    x0, noise (B, ...), t (B,) -> x_t, v (B, ...)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise, noise - x0


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift t' = s t / (1 + (s - 1) t) (s > 1 moves training towards noise)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(count: int, generator: torch.Generator, cfg: TimestepConfig) -> torch.Tensor:
    """(count,) training times in (0, 1): uniform, or logit-normal sigmoid(N(mean, std^2)) (SD3 Sec. 3.1),
    then shifted."""
    if cfg.sampling == "uniform":
        t = torch.rand(count, generator=generator)
    else:
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(count, generator=generator))
    return shift_timesteps(t, cfg.shift).clamp(1e-5, 1 - 1e-5)
