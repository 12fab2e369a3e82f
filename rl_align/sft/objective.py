"""Supervised warm-start objectives: flow matching plus the stage's regularizer, and one training step.

Every stage trains the velocity with the flow-matching loss (FLUX convention, as the samplers use it):
x_t = (1 - t) x0 + t eps, target v = eps - x0, L_diff = mean ||v_theta(x_t, t) - v||^2. What each stage adds
(attention switches, item phrases, condition ids, a regularizer) comes from its recipe in
``rl_align.sft.stages``.

Samples of a batch share position ids and the token layout; a stage whose position ids place each item
phrase (position_id) splits a batch into groups whose phrases fall on the same prompt tokens and
accumulates their gradients weighted by group size, so the loss is the batch mean whatever the split.
"""

from __future__ import annotations

import dataclasses

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from policies import Conditioning, FluxPolicy, load_balancing_loss, mask_tokens
from rl_align.core.flow_matching import flow_matching_pair, sample_timesteps
from rl_align.core.optim import apply_step
from rl_align.sft.config import OptimConfig, SFTConfig
from rl_align.sft.data import SFTBatch
from rl_align.sft.manifest import ManifestProblem, SampleRecord
from rl_align.sft.stages import stage_recipe



# ---- pure parts -----------------------------------------------------------------------------------------


def learning_rate_at(step: int, steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up over warmup_steps, then MS-CustomNet's Dual Stage Training: learning_rate for the
    first first_stage_fraction of the steps, second_learning_rate after (when it is > 0)."""
    rate = cfg.learning_rate
    if cfg.second_learning_rate > 0 and step >= math.ceil(cfg.first_stage_fraction * steps):
        rate = cfg.second_learning_rate
    if step < cfg.warmup_steps:
        rate *= (step + 1) / (cfg.warmup_steps + 1)
    return rate


# ---- the objective on a policy --------------------------------------------------------------------------


class LossTerms(NamedTuple):
    total: torch.Tensor  # scalar
    flow: torch.Tensor  # L_diff
    attention: torch.Tensor  # idar's Dice term (0 elsewhere), before lambda
    routing: torch.Tensor  # routing stage's L_route (0 elsewhere), before lambda
    balance: torch.Tensor  # MoE-LoRA load balancing (0 when its weight is 0)

    def floats(self) -> dict[str, float]:
        return {name: float(value) for name, value in self._asdict().items()}


class StageObjective:
    """The loss of ``cfg.stage`` for batches of the stage's data, on ``policy``."""

    def __init__(self, policy: FluxPolicy, cfg: SFTConfig):
        self.policy, self.cfg = policy, cfg
        self.stage = stage_recipe(cfg.stage)
        # the stage's capture switches on top of the attention mode the trained policy runs with everywhere
        mode = policy.attention_mode
        self.switches = dataclasses.replace(self.stage.switches, static_routing=mode.static_routing, temperature=mode.temperature)

    def condition_ids(self, categories: Sequence[str]) -> tuple[int, ...] | None:
        return self.policy.condition_ids(categories) if self.stage.condition_ids else None

    def check_samples(self, samples: Sequence[SampleRecord]) -> list[ManifestProblem]:
        """The samples the stage cannot use (``StageRecipe.check_sample``), with their manifest lines."""
        problems = []
        for sample in samples:
            reasons = self.stage.check_sample(self.policy, sample, self.cfg.data)
            if reasons:
                problems.append(ManifestProblem(sample.line, "; ".join(reasons)))
        return problems

    def groups(self, batch: SFTBatch) -> list[list[int]]:
        """Sample indices that can share one conditioning: position ids are shared by a batch, so when
        they place each phrase (shared spans) the samples group by phrase spans and condition ids.
        Per-sample spans (routing maps) keep the batch whole."""
        if self.stage.phrase_spans != "shared":
            return [list(range(len(batch.prompts)))]
        keyed: dict[tuple, list[int]] = {}
        for i, (prompt, captions, categories) in enumerate(zip(batch.prompts, batch.captions, batch.categories)):
            key = (self.policy.item_spans(prompt, captions), self.condition_ids(categories))
            keyed.setdefault(key, []).append(i)
        return list(keyed.values())

    def conditioning(self, batch: SFTBatch) -> Conditioning:
        """One conditioning for a batch whose samples share phrase spans and condition ids."""
        prompts = self.policy.encode_prompts(batch.prompts, condition_captions=batch.captions)
        spans = None
        if self.stage.phrase_spans != "none":
            spans = [self.policy.item_spans(p, c) for p, c in zip(batch.prompts, batch.captions)]
        if self.stage.phrase_spans == "shared":  # the group's captions may differ but fall on the same tokens
            prompts = prompts._replace(item_spans=spans[0])
        height, width = batch.targets.shape[-2:]
        conditioning = self.policy.condition(prompts, batch.references, height, width, condition_ids=self.condition_ids(batch.categories[0]))
        if self.stage.phrase_spans == "per_sample":
            conditioning = conditioning._replace(sample_item_spans=tuple(spans))
        return conditioning

    def plotted_terms(self) -> list[str]:
        """The loss terms this run can make non-zero."""
        extra = [self.stage.loss_term] if self.stage.loss_term else []
        return ["total", "flow", *extra] + (["balance"] if self.cfg.optim.load_balancing_weight > 0 else [])

    def loss(self, batch: SFTBatch, noise: torch.Tensor, t: torch.Tensor) -> LossTerms:
        """The stage's loss of one conditioning group. noise (B, C, h, w) and t (B,) fix the flow sample."""
        policy = self.policy
        conditioning = self.conditioning(batch)
        x0 = policy.encode_images(batch.targets)
        x_t, target = flow_matching_pair(x0, noise.to(x0.device), t.to(x0.device))
        out = policy(x_t, t, conditioning, self.switches)
        flow = F.mse_loss(out.velocity, target)
        zero = flow.new_zeros(())
        terms = {"flow": flow, "attention": zero, "routing": zero, "balance": zero}
        total = flow
        if self.stage.loss_term is not None:
            masks = mask_tokens(batch.masks.to(flow.device), conditioning.noisy_grid)
            terms[self.stage.loss_term] = self.stage.regularizer(out, masks)
            total = total + self.stage.regularizer_weight(self.cfg) * terms[self.stage.loss_term]
        if self.cfg.optim.load_balancing_weight > 0 and out.router:
            top_k = policy.cfg.moe_lora.top_k
            terms["balance"] = torch.stack([load_balancing_loss(r.logits, top_k) for r in out.router]).mean()
            total = total + self.cfg.optim.load_balancing_weight * terms["balance"]
        return LossTerms(total=total, **terms)

    def flow_sample(self, batch: SFTBatch, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (B, C, h, w) and times (B,) drawn from ``key`` for the whole batch, before any split into
        groups, so a sample's draw does not depend on the grouping."""
        generator = torch.Generator().manual_seed(key)
        shape = self.policy.latent_shape(*batch.targets.shape[-2:])
        noise = torch.randn(len(batch.prompts), *shape, generator=generator)
        return noise, sample_timesteps(len(batch.prompts), generator, self.cfg.timesteps)

    def batch_loss(self, batch: SFTBatch, key: int, backward: bool, scale: float = 1.0, model_calls: int = 0) -> LossTerms:
        """The batch-mean loss terms; with ``backward`` each group's share of ``scale`` x the loss is
        back-propagated as it is computed (one group's graph alive at a time).

        ``model_calls``: make at least this many forward (and backward) calls, repeating the last group
        with weight 0 (exact zero gradients, not counted in the terms): sharded processes make one
        collective per call, so all of them must make as many."""
        noise, t = self.flow_sample(batch, key)
        size = len(batch.prompts)
        groups = self.groups(batch)
        sums = None
        for call in range(max(len(groups), model_calls)):
            indices = groups[min(call, len(groups) - 1)]
            terms = self.loss(batch.select(indices), noise[indices], t[indices])
            weight = len(indices) / size if call < len(groups) else 0.0
            if backward:
                (scale * weight * terms.total).backward()
            if call >= len(groups):
                continue
            weighted = [weight * v.detach() for v in terms]
            sums = weighted if sums is None else [a + b for a, b in zip(sums, weighted)]
        return LossTerms(*sums)


class StepStats(NamedTuple):
    terms: LossTerms
    grad_norm: float
    skipped: bool


def train_step(
    objective: StageObjective,
    optimizer: torch.optim.Optimizer,
    batch: SFTBatch,
    key: int,
    learning_rate: float,
    total_samples: int | None = None,
    all_reduce: Callable[..., None] | None = None,
    sharded: bool = False,
) -> StepStats:
    """One optimizer step on ``batch`` with the flow sample drawn from ``key``, finished by the shared
    ``apply_step``: a non-finite loss or gradient skips it with a warning instead of corrupting the adapters.

    Data-parallel ranks pass ``total_samples`` (the samples of every rank's batch) and an in-place sum
    ``all_reduce``: each rank's loss counts by its share of all samples, gradients and loss terms are
    summed over ranks before clipping, so every rank takes the step of the mean over all samples (or
    skips it) together; the returned terms are those of all ranks. ``sharded`` (the policy is sharded
    with FSDP2; needs ``all_reduce``): backward sums the gradients itself, and every rank makes as many
    model calls as the rank with the most conditioning groups."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    optimizer.zero_grad(set_to_none=True)
    share = len(batch.prompts) / total_samples if total_samples is not None else 1.0
    model_calls = 0
    if sharded:
        calls = torch.tensor([float(len(objective.groups(batch)))])
        all_reduce(calls, "max")
        model_calls = int(calls)
    terms = objective.batch_loss(batch, key, backward=True, scale=share, model_calls=model_calls)
    if all_reduce is not None:
        summed = torch.stack([share * v.detach().double().cpu() for v in terms])
        all_reduce(summed)
        terms = LossTerms(*summed.float())
    outcome = apply_step(
        optimizer, objective.cfg.optim.max_grad_norm, loss_finite=math.isfinite(float(terms.total)),
        all_reduce=None if sharded else all_reduce, what=f"loss {float(terms.total):.4g} on manifest lines {list(batch.lines)}",
    )
    return StepStats(terms, outcome.grad_norm, outcome.skipped)
