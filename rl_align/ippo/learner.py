"""The policy update of IPPO (MultiCrafter Algorithm 1 lines 16-19): recompute the log-probs of the
rollout's window transitions under the current policy, form the GSPO (or per-step GRPO) objective with
group advantages, and take one clipped optimizer step.

Policy-agnostic: the policy enters only as a velocity callable per group (samplers' contract), so the
same update serves any model and is testable without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Sequence

import torch

from rl_align.core.optim import apply_step
from rl_align.ippo.losses import gaussian_mean_kl, grpo_step_objective, gspo_objective
from samplers import Velocity, WindowTransition


@dataclass(frozen=True)
class LearnerConfig:
    algorithm: Literal["gspo", "grpo"] = "gspo"  # "grpo": per-step ratios (MixGRPO), for comparison
    clip_low: float = 1e-3  # eps_low; small because each log-prob is a mean over the latent dims
    clip_high: float = 1e-3  # eps_high
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0  # grad-norm spikes followed by reward collapse are the commonest failure
    kl_beta: float = 0.0  # weight of KL(policy || reference policy); 0 turns the reference pass off
    advantage_eps: float = 1e-4  # A = (R - mean) / (std + eps) within each group
    advantage_clip: float = 5.0
    # Normalize each reward component within its group before weighting (instead of normalizing the sum).
    per_component_advantages: bool = False

    def __post_init__(self) -> None:
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0 or self.kl_beta < 0:
            raise ValueError("learning_rate and max_grad_norm must be > 0 and kl_beta >= 0")


class GroupTransitions(NamedTuple):
    """What the update needs of one rolled-out chunk of a group (n samples, W window steps)."""

    group: int  # index into the caller's velocity factories
    transitions: tuple[WindowTransition, ...]  # from samplers.mixed_rollout, in step order
    advantages: torch.Tensor  # (n,)


class UpdateStats(NamedTuple):
    loss: float  # -J (plus kl_beta * KL), averaged over samples
    ratio_mean: float  # mean importance ratio (sequence-level for GSPO)
    clip_fraction: float  # fraction of ratios whose clipped branch was active
    kl: float  # mean KL to the reference policy (0 when kl_beta == 0)
    grad_norm: float  # before clipping
    skipped: bool  # True when the loss or gradient was not finite and no step was taken


def window_log_probs(
    velocity: Velocity, transitions: Sequence[WindowTransition], reference: Velocity | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (n, W) of stored transitions under ``velocity`` (with grad), each with the eta and
    reduction it was sampled with, and the per-sample KL (n,) to ``reference`` averaged over the steps
    (zeros without a reference)."""
    log_probs, kls = [], []
    for t in transitions:
        sigma = torch.full((t.x_t.shape[0],), t.sigma, dtype=torch.float32, device=t.x_t.device)
        step = t.recompute(velocity(t.x_t, sigma))
        log_probs.append(step.log_prob)
        if reference is not None:
            with torch.no_grad():
                ref = t.recompute(reference(t.x_t, sigma))
            kls.append(gaussian_mean_kl(step.mean, ref.mean, step.std, t.reduce))
    kl = torch.stack(kls, 1).mean(1) if kls else torch.zeros(len(log_probs[0]), device=log_probs[0].device)
    return torch.stack(log_probs, 1), kl


def policy_update(
    chunks: Sequence[GroupTransitions],
    velocity_of: Callable[[int], Velocity],
    optimizer: torch.optim.Optimizer,
    cfg: LearnerConfig,
    reference_of: Callable[[int], Velocity] | None = None,
    total_samples: int | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> UpdateStats:
    """One optimizer step over all chunks of an iteration.

    Each chunk is recomputed with the same samples together as in the rollout (so the first update sees
    a ratio of exactly 1) and back-propagated on its own (one chunk's graph in memory at a time), its
    loss weighted by its share of the samples, so the step equals that of the mean over all samples.
    The step is ``rl_align.core.optim.apply_step``: a non-finite loss or gradient skips it with a warning;
    gradients are clipped to max_grad_norm.

    Data-parallel learners pass ``total_samples`` (the samples of all ranks together) and an in-place
    sum ``all_reduce`` (torch.distributed.all_reduce): gradients and statistics are summed over ranks
    before clipping, so every rank takes the same step, or skips it together.
    """
    if not chunks:
        raise ValueError("policy_update needs at least one chunk of transitions")
    objective = gspo_objective if cfg.algorithm == "gspo" else grpo_step_objective
    total = total_samples if total_samples is not None else sum(len(c.advantages) for c in chunks)
    optimizer.zero_grad(set_to_none=True)
    # Sums over this rank's samples: non-finite losses, loss, ratio, clipped, ratio count, KL.
    sums = torch.zeros(6, dtype=torch.float64)
    for chunk in chunks:
        reference = reference_of(chunk.group) if (reference_of is not None and cfg.kl_beta > 0) else None
        logp_new, kl = window_log_probs(velocity_of(chunk.group), chunk.transitions, reference)
        logp_old = torch.stack([t.log_prob for t in chunk.transitions], 1).detach()
        out = objective(logp_new, logp_old, chunk.advantages.to(logp_new.device), cfg.clip_low, cfg.clip_high)
        loss = out.loss + cfg.kl_beta * kl.mean()
        weight = len(chunk.advantages) / total
        if not torch.isfinite(loss):
            sums[0] = 1.0
            break
        (weight * loss).backward()
        sums[1:] += torch.tensor(
            [weight * float(loss.detach()), float(out.ratio.sum()), float(out.clipped.float().sum()), out.ratio.numel(), weight * float(kl.mean().detach())],
            dtype=torch.float64,
        )

    if all_reduce is not None:
        all_reduce(sums)  # before the step, so every rank knows whether any loss was non-finite
    outcome = apply_step(optimizer, cfg.max_grad_norm, loss_finite=float(sums[0]) == 0, all_reduce=all_reduce, what="policy update")
    if outcome.skipped:
        return UpdateStats(math.nan, math.nan, math.nan, math.nan, outcome.grad_norm, True)
    _, loss_sum, ratio_sum, clipped_sum, ratio_count, kl_sum = sums.tolist()
    return UpdateStats(loss_sum, ratio_sum / ratio_count, clipped_sum / ratio_count, kl_sum, outcome.grad_norm, False)
