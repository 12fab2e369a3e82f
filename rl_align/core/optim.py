"""The optimizer and the step both trainers take: AdamW over the trainable adapters, then one
``apply_step``: sum gradients over data-parallel ranks, skip a non-finite step, clip, step, zero."""

from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from policies import full_tensor
from rl_align.core.distributed import sum_gradients

log = logging.getLogger(__name__)


class AdamWSettings(Protocol):
    """The fields of a trainer's optimizer section (LearnerConfig, OptimConfig) that AdamW takes."""

    learning_rate: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float


class StepOutcome(NamedTuple):
    grad_norm: float  # before clipping; nan when the loss was not finite
    skipped: bool  # True when no step was taken (non-finite loss or gradient)


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: AdamWSettings) -> torch.optim.AdamW:
    params = list(params)
    if not params:
        raise ValueError("the policy has no trainable adapters: enable policy.lora, policy.moe_lora or policy.dual_branch")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2))


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def apply_step(
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    loss_finite: bool,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    what: str = "",
) -> StepOutcome:
    """Finish a step whose gradients have been accumulated (the caller zeroed them before).

    With ``all_reduce`` (data-parallel ranks that replicate the adapters) the gradients are first replaced
    by their sum over ranks (sharded ranks' backward has summed them already, pass none);
    ``loss_finite`` must then already agree on every rank (reduce the loss statistics first), so all ranks
    step or skip together. A non-finite loss or gradient norm skips the step with a warning naming
    ``what`` (the batch); otherwise gradients are clipped to ``max_grad_norm`` and the optimizer steps.
    The gradients are zeroed either way."""
    params = optimizer_parameters(optimizer)
    if all_reduce is not None:
        sum_gradients(params, all_reduce)
    # sharded parameters (FSDP2) hold their shard of the summed gradient; their norm is the whole one
    grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))) if loss_finite else math.nan
    skipped = not (loss_finite and math.isfinite(grad_norm))
    if skipped:
        log.warning("non-finite %s%s: step skipped", "gradient norm" if loss_finite else "loss", f" ({what})" if what else "")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(grad_norm, skipped)
