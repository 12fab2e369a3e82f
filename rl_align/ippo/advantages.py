"""Group-relative advantages (MultiCrafter Algorithm 1 line 16; GRPO).

A group is the N images generated for one (prompt, reference set) from the same initial noise.
"""

from __future__ import annotations

from typing import Mapping

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4, clip: float = 5.0) -> torch.Tensor:
    """A_i = clip((R_i - mean_g) / (std_g + eps), -clip, clip) for the group g of sample i.

    rewards: (B,) float; group_ids: (B,) int, any labels. std_g is the population std (ddof 0) of the
    group's rewards, so a group whose rewards are all equal gets zeros (and a group of one sample too).
    Non-finite rewards are an error: they would silently poison the whole group.
    Returns (B,) fp32.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be (B,), got {tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"non-finite rewards at batch indices {bad}")
    rewards = rewards.float()
    _, index = torch.unique(group_ids, return_inverse=True)  # (B,) in [0, G)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(num_groups).index_add_(0, index, torch.ones_like(rewards))
    mean = torch.zeros(num_groups).index_add_(0, index, rewards) / count
    centred = rewards - mean[index]
    std = (torch.zeros(num_groups).index_add_(0, index, centred.square()) / count).sqrt()
    return (centred / (std[index] + eps)).clamp(-clip, clip)


def weighted_component_advantages(
    components: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_ids: torch.Tensor,
    eps: float = 1e-4,
    clip: float = 5.0,
) -> torch.Tensor:
    """sum_k w_k * group_advantages(R_k): each reward component normalized within its group on its own
    scale before weighting, so a component with a large raw spread cannot drown the others.

    components: name -> (B,) rewards; weights: name -> w_k (every component needs a weight). Returns (B,).
    """
    missing = sorted(set(components) - set(weights))
    if missing:
        raise ValueError(f"no weight for reward components {missing}; weights given for {sorted(weights)}")
    if not components:
        raise ValueError("no reward components given")
    return sum(weights[name] * group_advantages(values, group_ids, eps, clip) for name, values in components.items())
