"""Losses on the policy's outputs."""

from __future__ import annotations

import torch


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss (MultiCrafter Eq. 5): for each sample b,
    L_b = sum_i (1 - (2 sum_j pred_ij target_ij + eps) / (sum_j pred_ij + sum_j target_ij + eps)),
    summed over the N subjects i, the j running over the L token positions; returns mean_b L_b.
    pred, target (B, N, L) in [0, 1] -> scalar."""
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"pred and target must both be (B, N, L), got {tuple(pred.shape)} and {tuple(target.shape)}")
    target = target.to(pred.dtype)
    overlap = (pred * target).sum(dim=-1)
    total = pred.sum(dim=-1) + target.sum(dim=-1)
    dice = (2 * overlap + eps) / (total + eps)  # (B, N)
    return (1 - dice).sum(dim=1).mean()
