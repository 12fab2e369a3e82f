"""Image conversions shared by the trainers (sample grids, rollout images for the rewards)."""

from __future__ import annotations

import numpy as np
import torch


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
