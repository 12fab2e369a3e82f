"""Policy-gradient objectives over the SDE-window steps of a rollout.

Shapes: B samples, W window steps. Log-probs are per step (samplers.sde_step_with_logprob), already
reduced over the latent dims.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar: -J, to minimize
    ratio: torch.Tensor  # (B,) GSPO sequence ratios s_i, or (B, W) per-step ratios for GRPO; detached
    clipped: torch.Tensor  # same shape as ratio, bool: the clipped branch is the active (gradient-free) one


def _check(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> None:
    if logp_new.ndim != 2 or logp_old.shape != logp_new.shape:
        raise ValueError(f"logp_new and logp_old must both be (B, W), got {tuple(logp_new.shape)} and {tuple(logp_old.shape)}")
    if advantages.shape != logp_new.shape[:1]:
        raise ValueError(f"advantages must be ({logp_new.shape[0]},), got {tuple(advantages.shape)}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) and where the clipped branch is strictly smaller."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def gspo_objective(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> PolicyLoss:
    """GSPO (MultiCrafter Eq. 7-8): one importance ratio per sample over its whole window,

        s_i = exp( mean_{t in W} (logp_theta(t) - logp_old(t)) )
        J   = mean_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i),   loss = -J.

    The geometric-mean ratio does not swing with single steps, which keeps MoE-LoRA routing changes from
    destabilizing training. logp_*: (B, W); advantages: (B,).
    """
    _check(logp_new, logp_old, advantages, clip_low, clip_high)
    ratio = torch.exp((logp_new.float() - logp_old.float()).mean(dim=1))  # (B,)
    surrogate, clipped = _clipped_surrogate(ratio, advantages.float(), clip_low, clip_high)
    return PolicyLoss(-surrogate.mean(), ratio.detach(), clipped)


def gspo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """The scalar GSPO loss -J of ``gspo_objective``."""
    return gspo_objective(logp_new, logp_old, advantages, clip_low, clip_high).loss


def grpo_step_objective(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> PolicyLoss:
    """Per-step GRPO (MixGRPO, MultiCrafter Eq. 2), for comparison with GSPO:

        r_i^t = exp(logp_theta(t) - logp_old(t))
        J     = mean_i mean_{t in W} min(r_i^t A_i, clip(r_i^t, 1 - eps_low, 1 + eps_high) A_i).
    """
    _check(logp_new, logp_old, advantages, clip_low, clip_high)
    ratio = torch.exp(logp_new.float() - logp_old.float())  # (B, W)
    surrogate, clipped = _clipped_surrogate(ratio, advantages.float()[:, None], clip_low, clip_high)
    return PolicyLoss(-surrogate.mean(), ratio.detach(), clipped)


def gaussian_mean_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float, reduce: str = "mean") -> torch.Tensor:
    """KL between the policy's and the reference policy's Gaussian transitions that share a std
    (Flow-GRPO's KL term): KL = ||mean - mean_ref||^2 / (2 std^2), per sample, with the squared distance
    reduced over the latent dims like the log-probs (``reduce`` "mean" or "sum").

    mean, mean_ref: (B, ...); std: a float, a 0-d tensor or (B, 1, ..., 1). Returns (B,).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    per_element = (mean.float() - mean_ref.float()).square() / (2 * torch.as_tensor(std, dtype=torch.float32) ** 2)
    dims = tuple(range(1, mean.ndim))
    return per_element.mean(dim=dims) if reduce == "mean" else per_element.sum(dim=dims)
