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


def routing_loss(maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """AnyStory's instance-aware routing regularization (Eq. 4) without its lambda:
    L = mean_k mean_i mean_j (M^k_ij - M^gt_ij)^2 over the layers k, the N subjects i and the L token
    positions j, then mean over the batch. The paper's squared L2 norm sums over positions; the mean
    keeps lambda (0.1) independent of the resolution.
    maps (B, K, N, L) in [0, 1], target (B, N, L) in [0, 1] -> scalar."""
    if maps.dim() != 4 or target.dim() != 3 or maps.shape[0] != target.shape[0] or maps.shape[2:] != target.shape[1:]:
        raise ValueError(f"maps must be (B, K, N, L) and target (B, N, L), got {tuple(maps.shape)} and {tuple(target.shape)}")
    return (maps - target.to(maps.dtype)[:, None]).square().mean()
