"""Sampler settings: the schedule, the SDE window and the ODE tail. Defaults are MultiCrafter's IPPO
settings (T=16, w=2, tau=50, s=1; MixGRPO's eta=0.7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from samplers.schedule import flux_sigmas
from samplers.steps import Reduce
from samplers.window import random_window_at, window_at


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 16  # T, sampling steps per image
    # "dynamic": FLUX's resolution-dependent exponential shift; "static": s t / (1 + (s - 1) t); "none".
    time_shift: Literal["dynamic", "static", "none"] = "dynamic"
    static_shift: float = 3.0  # s, used when time_shift == "static"
    base_shift: float = 0.5  # mu at base_seq_len image tokens (dynamic shift)
    max_shift: float = 1.15  # mu at max_seq_len image tokens (dynamic shift)
    base_seq_len: int = 256
    max_seq_len: int = 4096
    eta: float = 0.7  # SDE noise level inside the window (0.9 is also common for FLUX)
    # How a step's Gaussian log-density is reduced over latent dims; "mean" sets the scale of the
    # GSPO clip range (1e-4..1e-3 on FLUX-sized latents).
    logprob_reduce: Reduce = "mean"
    window_strategy: Literal["sliding", "random"] = "sliding"
    window_size: int = 2  # w
    window_shift_interval: int = 50  # tau, iterations between window moves
    window_stride: int = 1  # s, steps the window advances per move
    # ODE steps after the window: "dpmpp_2m" with tail_keep_fraction < 1 is MixGRPO-Flash.
    tail_solver: Literal["euler", "dpmpp_2m"] = "euler"
    tail_keep_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.window_size <= self.num_steps:
            raise ValueError(f"window_size must be in [1, num_steps={self.num_steps}], got {self.window_size}")
        if self.window_shift_interval < 1:
            raise ValueError(f"window_shift_interval must be >= 1, got {self.window_shift_interval}")
        if self.window_stride < 0:
            raise ValueError(f"window_stride must be >= 0, got {self.window_stride}")
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if not 0 < self.tail_keep_fraction <= 1:
            raise ValueError(f"tail_keep_fraction must be in (0, 1], got {self.tail_keep_fraction}")
        if self.static_shift <= 0:
            raise ValueError(f"static_shift must be > 0, got {self.static_shift}")

    def sigmas(self, image_seq_len: int) -> torch.Tensor:
        """The (num_steps + 1,) schedule for images of ``image_seq_len`` packed tokens."""
        if self.time_shift == "dynamic":
            return flux_sigmas(
                self.num_steps,
                image_seq_len,
                base_seq_len=self.base_seq_len,
                max_seq_len=self.max_seq_len,
                base_shift=self.base_shift,
                max_shift=self.max_shift,
            )
        return flux_sigmas(self.num_steps, shift=self.static_shift if self.time_shift == "static" else None)

    def window(self, iteration: int, seed: int) -> list[int]:
        """SDE step indices at the 0-based global iteration (``seed`` matters for "random" only)."""
        if self.window_strategy == "random":
            return random_window_at(seed, iteration, self.num_steps, self.window_size)
        return window_at(iteration, self.num_steps, self.window_size, self.window_shift_interval, self.window_stride)
