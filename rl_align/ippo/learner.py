"""The policy update of IPPO (MultiCrafter Algorithm 1 lines 16-19): recompute the log-probs of the
rollout's window transitions under the current policy, form the GSPO (or per-step GRPO) objective with
group advantages, and take one clipped optimizer step per minibatch.

An iteration takes ``epochs x minibatches`` steps over its rollout (``minibatch_plan``): the first is
on-policy (every ratio is exactly 1), the later ones are off-policy against the rollout's stored
log-probs, which is where clipping and GSPO's sequence-level ratio differ from per-step GRPO.

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
from samplers.noise import key_seed


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
    # M optimizer steps per pass over the rollout: its chunks, whole groups where a minibatch holds them
    # (the paper's per-prompt update), are split into M equal minibatches in a seeded order.
    minibatches: int = 1
    epochs: int = 1  # passes over the rollout per iteration
    # Data-parallel learners (workers.learners > 1): "replicate" keeps the whole policy on every learner and
    # all-reduces the gradients; "fsdp" shards the transformer (frozen base, adapters, their gradients and
    # AdamW states) over the learners with FSDP2 (FluxPolicy.shard_transformer), 1/learners of each per GPU.
    sharding: Literal["replicate", "fsdp"] = "replicate"
    # Keep only each transformer block's inputs during the learner's forward and recompute the block in
    # backward (FluxPolicy.enable_block_checkpointing): activations of a window drop from every block's
    # saved tensors to the blocks' inputs, for about one more forward of compute.
    checkpoint_blocks: bool = False

    def __post_init__(self) -> None:
        if self.minibatches < 1 or self.epochs < 1:
            raise ValueError(f"minibatches and epochs must be >= 1, got {self.minibatches}, {self.epochs}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0 or self.kl_beta < 0:
            raise ValueError("learning_rate and max_grad_norm must be > 0 and kl_beta >= 0")


class GroupTransitions(NamedTuple):
    """What the update needs of one rolled-out chunk of a group (n samples, W window steps)."""

    group: int  # index into the caller's velocity factories
    transitions: tuple[WindowTransition, ...]  # from samplers.mixed_rollout, in step order
    advantages: torch.Tensor  # (n,)
    # MoE-LoRA: per window step, the top-1 expert the rollout policy chose for each routed token,
    # (n, R) integers (RoutedVelocity.last_experts); None for policies without experts.
    experts: tuple[torch.Tensor, ...] | None = None


class UpdateStats(NamedTuple):
    loss: float  # -J (plus kl_beta * KL), averaged over samples
    ratio_mean: float  # mean importance ratio (sequence-level for GSPO, per step for GRPO)
    ratio_max_deviation: float  # max |ratio - 1|
    clip_fraction: float  # fraction of ratios whose clipped branch was active
    kl: float  # mean KL to the reference policy (0 when kl_beta == 0)
    grad_norm: float  # before clipping
    # MoE-LoRA: the fraction of routed tokens whose top-1 expert now differs from the rollout's; nan
    # when the transitions carry no expert choices.
    expert_flip_rate: float
    skipped: bool  # True when the loss or gradient was not finite and no step was taken


# all_reduce(tensor, op): in place over data-parallel ranks, op "sum" or "max"
AllReduce = Callable[..., None]


def minibatch_plan(chunk_groups: Sequence[int], minibatches: int, epochs: int, seed: int, iteration: int) -> list[list[int]]:
    """The chunk indices of each optimizer step of an iteration, ``epochs x minibatches`` lists.

    Each epoch puts the groups in an order drawn from (seed, iteration, epoch), lays out each group's
    chunks in their rollout order, and cuts that sequence into ``minibatches`` equal parts: whole groups
    when a part holds a whole number of them, else consecutive chunks (a group larger than a minibatch
    spans several). ``chunk_groups[j]`` is chunk j's group; every group has the same number of chunks.
    """
    chunks = len(chunk_groups)
    if chunks % minibatches:
        raise ValueError(f"{chunks} rollout chunks per iteration cannot be split into learner.minibatches={minibatches} equal minibatches")
    by_group: dict[int, list[int]] = {}
    for index, group in enumerate(chunk_groups):
        by_group.setdefault(group, []).append(index)
    groups = sorted(by_group)
    size = chunks // minibatches
    plan = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(key_seed("minibatches", seed, iteration, epoch) % 2**63)
        order = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        laid_out = [index for group in order for index in by_group[group]]
        plan += [laid_out[k * size : (k + 1) * size] for k in range(minibatches)]
    return plan


class WindowLogProbs(NamedTuple):
    log_probs: torch.Tensor  # (n, W), with grad
    kl: torch.Tensor  # (n,) mean over the window steps of the KL to the reference (zeros without one)
    expert_flips: int  # routed tokens whose top-1 expert differs from the rollout's
    routed_tokens: int  # tokens compared (0 without expert choices)


def window_log_probs(
    velocity: Velocity, transitions: Sequence[WindowTransition], reference: Velocity | None = None,
    experts: Sequence[torch.Tensor] | None = None,
) -> WindowLogProbs:
    """Log-probs of stored transitions under ``velocity``, each with the eta and reduction it was sampled
    with; the per-sample KL to ``reference``; and, given the rollout's ``experts`` per step and a
    velocity that exposes the top-1 experts of its last call as ``last_experts`` (B, R) (as
    policies.PolicyVelocity does), how many routed tokens changed their top-1 expert."""
    log_probs, kls = [], []
    flips = routed = 0
    for i, t in enumerate(transitions):
        sigma = torch.full((t.x_t.shape[0],), t.sigma, dtype=torch.float32, device=t.x_t.device)
        step = t.recompute(velocity(t.x_t, sigma))
        log_probs.append(step.log_prob)
        current = getattr(velocity, "last_experts", None) if experts is not None else None
        if current is not None:
            flips += int((current.cpu() != experts[i]).sum())
            routed += experts[i].numel()
        if reference is not None:
            with torch.no_grad():
                ref = t.recompute(reference(t.x_t, sigma))
            kls.append(gaussian_mean_kl(step.mean, ref.mean, step.std, t.reduce))
    kl = torch.stack(kls, 1).mean(1) if kls else torch.zeros(len(log_probs[0]), device=log_probs[0].device)
    return WindowLogProbs(torch.stack(log_probs, 1), kl, flips, routed)


def policy_update(
    chunks: Sequence[GroupTransitions],
    velocity_of: Callable[[int], Velocity],
    optimizer: torch.optim.Optimizer,
    cfg: LearnerConfig,
    reference_of: Callable[[int], Velocity] | None = None,
    total_samples: int | None = None,
    all_reduce: AllReduce | None = None,
    sharded: bool = False,
) -> UpdateStats:
    """One optimizer step over the chunks of a minibatch.

    Each chunk is recomputed with the same samples together as in the rollout (so an on-policy step sees
    a ratio of exactly 1) and back-propagated on its own (one chunk's graph in memory at a time), its
    loss weighted by its share of the samples, so the step equals that of the mean over all samples.
    The step is ``rl_align.core.optim.apply_step``: a non-finite loss or gradient skips it with a warning;
    gradients are clipped to max_grad_norm.

    Data-parallel learners pass ``total_samples`` (the minibatch's samples on all ranks together) and an
    in-place ``all_reduce(tensor, op)`` (torch.distributed.all_reduce): gradients and statistics are
    summed (the ratio spread maxed) over ranks before clipping, so every rank takes the same step, or
    skips it together. A replicated rank may hold no chunk of a minibatch; it then adds nothing.
    ``sharded``: the policy is sharded (FSDP2), backward sums the gradients over ranks itself, and every
    rank must hold as many chunks (each forward and backward is a collective); a non-finite loss is still
    back-propagated so the ranks stay in step, and the step is skipped.
    """
    if not chunks and all_reduce is None:
        raise ValueError("policy_update needs at least one chunk of transitions")
    objective = gspo_objective if cfg.algorithm == "gspo" else grpo_step_objective
    total = total_samples if total_samples is not None else sum(len(c.advantages) for c in chunks)
    optimizer.zero_grad(set_to_none=True)
    # Sums over this rank's samples: non-finite losses, loss, ratio, clipped, ratio count, KL, flips, routed.
    sums = torch.zeros(8, dtype=torch.float64)
    deviation = torch.zeros(1, dtype=torch.float64)  # max |ratio - 1|
    for chunk in chunks:
        reference = reference_of(chunk.group) if (reference_of is not None and cfg.kl_beta > 0) else None
        new = window_log_probs(velocity_of(chunk.group), chunk.transitions, reference, chunk.experts)
        logp_old = torch.stack([t.log_prob for t in chunk.transitions], 1).detach()
        out = objective(new.log_probs, logp_old, chunk.advantages.to(new.log_probs.device), cfg.clip_low, cfg.clip_high)
        loss = out.loss + cfg.kl_beta * new.kl.mean()
        weight = len(chunk.advantages) / total
        if not torch.isfinite(loss):
            sums[0] = 1.0
            if not sharded:
                break
        (weight * loss).backward()
        if sums[0]:
            continue
        sums[1:] += torch.tensor(
            [weight * float(loss.detach()), float(out.ratio.sum()), float(out.clipped.float().sum()), out.ratio.numel(),
             weight * float(new.kl.mean().detach()), new.expert_flips, new.routed_tokens],
            dtype=torch.float64,
        )
        deviation = torch.maximum(deviation, (out.ratio.double() - 1).abs().max().cpu().reshape(1))

    if all_reduce is not None:  # before the step, so every rank knows whether any loss was non-finite
        all_reduce(sums, "sum")
        all_reduce(deviation, "max")
    outcome = apply_step(optimizer, cfg.max_grad_norm, loss_finite=float(sums[0]) == 0, all_reduce=None if sharded else all_reduce, what="policy update")
    _, loss_sum, ratio_sum, clipped_sum, ratio_count, kl_sum, flips, routed = sums.tolist()
    flip_rate = flips / routed if routed else math.nan
    if outcome.skipped:
        return UpdateStats(math.nan, math.nan, math.nan, math.nan, math.nan, outcome.grad_norm, flip_rate, True)
    return UpdateStats(
        loss_sum, ratio_sum / ratio_count, float(deviation), clipped_sum / ratio_count, kl_sum, outcome.grad_norm, flip_rate, False
    )
