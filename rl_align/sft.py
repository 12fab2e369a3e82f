"""Supervised warm-start objectives: flow matching plus each stage's regularizer, and one training step.

Every stage trains the velocity with the flow-matching loss (FLUX convention, as the samplers use it):
x_t = (1 - t) x0 + t eps, target v = eps - x0, L_diff = mean ||v_theta(x_t, t) - v||^2. On top:

| stage | attention switches | extra loss |
| --- | --- | --- |
| single | none | none (MultiCrafter's single-subject pre-training) |
| idar | map capture in double blocks | lambda Dice(maps, masks), lambda 0.3 (MultiCrafter Eq. 4-6) |
| diptych | MUSAR static routing; dual-branch LoRA | none; data curriculum single -> 80/20 -> same category |
| position_id | Dynamic Attention Modulation; condition-id positions (policy.condition_categories) | none (One-for-All) |
| routing | prompt routing-map capture | lambda mean ||M - M_gt||^2, lambda 0.1 (AnyStory Eq. 4) |

Samples of a batch share position ids and the token layout; position_id, whose text ids place each item
phrase, splits a batch into groups whose phrases fall on the same prompt tokens and accumulates their
gradients weighted by group size, so the loss is the batch mean whatever the split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from policies import AttentionSwitches, Conditioning, FluxPolicy, PolicyConfig, dice_loss, load_balancing_loss, mask_tokens, routing_loss
from rl_align.distributed import sum_gradients
from rl_align.sft_config import DiptychConfig, OptimConfig, SFTConfig, TimestepConfig
from rl_align.sft_data import SFTBatch
from rl_align.sft_manifest import ManifestProblem, SampleRecord
from samplers.noise import key_seed

log = logging.getLogger(__name__)

PHRASE_STAGES = ("position_id", "routing")  # stages that locate each subject's caption in the prompt
DiptychSource = Literal["single", "random", "same_category"]


# ---- pure parts -----------------------------------------------------------------------------------------


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy input and the regression target of flow matching (FLUX convention, t = 1 is noise):
    x_t = (1 - t) x0 + t eps and v = eps - x0, so that an Euler step x_t + (t' - t) v lands on the same line.
    x0, noise (B, ...), t (B,) -> x_t, v (B, ...)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise, noise - x0


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift t' = s t / (1 + (s - 1) t) (s > 1 moves training towards noise)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(count: int, generator: torch.Generator, cfg: TimestepConfig) -> torch.Tensor:
    """(count,) training times in (0, 1): uniform, or logit-normal sigmoid(N(mean, std^2)) (SD3 Sec. 3.1),
    then shifted."""
    if cfg.sampling == "uniform":
        t = torch.rand(count, generator=generator)
    else:
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(count, generator=generator))
    return shift_timesteps(t, cfg.shift).clamp(1e-5, 1 - 1e-5)


def learning_rate_at(step: int, steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up over warmup_steps, then MS-CustomNet's Dual Stage Training: learning_rate for the
    first first_stage_fraction of the steps, second_learning_rate after (when it is > 0)."""
    rate = cfg.learning_rate
    if cfg.second_learning_rate > 0 and step >= math.ceil(cfg.first_stage_fraction * steps):
        rate = cfg.second_learning_rate
    if step < cfg.warmup_steps:
        rate *= (step + 1) / (cfg.warmup_steps + 1)
    return rate


def diptych_source(step: int, cfg: DiptychConfig, seed: int) -> DiptychSource:
    """MUSAR's three-phase curriculum: single-subject batches for single_steps, then for mixed_steps a
    seeded draw of single-subject batches (mixed_single_fraction) or random-pair diptychs, then
    same-category diptychs."""
    if step < cfg.single_steps:
        return "single"
    if step < cfg.single_steps + cfg.mixed_steps:
        draw = key_seed("diptych-mix", seed, step) / 2**63
        return "single" if draw < cfg.mixed_single_fraction else "random"
    return "same_category"


def stage_policy(policy: PolicyConfig, stage: str) -> PolicyConfig:
    """The policy a stage trains: diptych puts MUSAR's dual-branch LoRA on the attention projections in
    place of plain LoRA; position_id uses One-for-All's condition-id positions with the temperature MLP.
    Other stages train the configured adapters as they are."""
    if stage == "diptych":
        return dataclasses.replace(
            policy, lora=dataclasses.replace(policy.lora, enabled=False), dual_branch=dataclasses.replace(policy.dual_branch, enabled=True)
        )
    if stage == "position_id":
        return dataclasses.replace(policy, position_scheme="condition_id", attention=dataclasses.replace(policy.attention, temperature=True))
    return policy


def stage_switches(stage: str) -> AttentionSwitches:
    return {
        "idar": AttentionSwitches(capture=True),
        "diptych": AttentionSwitches(static_routing=True),
        "position_id": AttentionSwitches(temperature=True),
        "routing": AttentionSwitches(capture_routing=True),
    }.get(stage, AttentionSwitches())


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
        self.policy, self.cfg, self.stage = policy, cfg, cfg.stage
        self.switches = stage_switches(cfg.stage)

    def condition_ids(self, categories: Sequence[str]) -> tuple[int, ...] | None:
        return self.policy.condition_ids(categories) if self.stage == "position_id" else None

    def check_samples(self, samples: Sequence[SampleRecord]) -> list[ManifestProblem]:
        """What the stage needs beyond a valid manifest: captions inside their prompts (phrase stages)
        and categories with a condition id (position_id)."""
        problems = []
        for sample in samples:
            reasons = []
            if self.stage == "position_id":
                try:
                    self.policy.condition_ids([s.category for s in sample.subjects])
                except ValueError as exc:
                    reasons.append(str(exc))
            if self.stage in PHRASE_STAGES:
                try:
                    self.policy.item_spans(sample.prompt, [s.caption for s in sample.subjects])
                except ValueError as exc:
                    reasons.append(f"stage {self.stage} needs each caption in the prompt: {exc}")
            if reasons:
                problems.append(ManifestProblem(sample.line, "; ".join(reasons)))
        return problems

    def groups(self, batch: SFTBatch) -> list[list[int]]:
        """Sample indices that can share one conditioning: position_id's text ids place each phrase, and
        ids are shared by a batch, so its samples group by phrase spans (and condition ids). Routing maps
        take each sample's own spans: one group."""
        if self.stage != "position_id":
            return [list(range(len(batch.prompts)))]
        keyed: dict[tuple, list[int]] = {}
        for i, (prompt, captions, categories) in enumerate(zip(batch.prompts, batch.captions, batch.categories)):
            key = (self.policy.item_spans(prompt, captions), self.condition_ids(categories))
            keyed.setdefault(key, []).append(i)
        return list(keyed.values())

    def conditioning(self, batch: SFTBatch) -> Conditioning:
        """One conditioning for a batch whose samples share phrase spans and condition ids."""
        prompts = self.policy.encode_prompts(batch.prompts)
        spans = [self.policy.item_spans(p, c) for p, c in zip(batch.prompts, batch.captions)] if self.stage in PHRASE_STAGES else None
        if self.stage == "position_id":  # the group's captions may differ but fall on the same tokens
            prompts = prompts._replace(item_spans=spans[0])
        height, width = batch.targets.shape[-2:]
        conditioning = self.policy.condition(prompts, batch.references, height, width, condition_ids=self.condition_ids(batch.categories[0]))
        if self.stage == "routing":
            conditioning = conditioning._replace(sample_item_spans=tuple(spans))
        return conditioning

    def loss(self, batch: SFTBatch, noise: torch.Tensor, t: torch.Tensor) -> LossTerms:
        """The stage's loss of one conditioning group. noise (B, C, h, w) and t (B,) fix the flow sample."""
        policy = self.policy
        conditioning = self.conditioning(batch)
        x0 = policy.encode_images(batch.targets)
        x_t, target = flow_matching_pair(x0, noise.to(x0.device), t.to(x0.device))
        out = policy(x_t, t, conditioning, self.switches)
        flow = F.mse_loss(out.velocity, target)
        zero = flow.new_zeros(())
        attention = routing = balance = zero
        total = flow
        if self.stage in ("idar", "routing"):
            masks = mask_tokens(batch.masks.to(flow.device), conditioning.noisy_grid)
            if self.stage == "idar":
                attention = dice_loss(out.attention_maps, masks)
                total = total + self.cfg.idar.attention_weight * attention
            else:
                routing = routing_loss(out.routing_maps, masks)
                total = total + self.cfg.routing.routing_weight * routing
        if self.cfg.optim.load_balancing_weight > 0 and out.router:
            top_k = policy.cfg.moe_lora.top_k
            balance = torch.stack([load_balancing_loss(r.logits, top_k) for r in out.router]).mean()
            total = total + self.cfg.optim.load_balancing_weight * balance
        return LossTerms(total, flow, attention, routing, balance)

    def flow_sample(self, batch: SFTBatch, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (B, C, h, w) and times (B,) drawn from ``key`` for the whole batch, before any split into
        groups, so a sample's draw does not depend on the grouping."""
        generator = torch.Generator().manual_seed(key)
        shape = self.policy.latent_shape(*batch.targets.shape[-2:])
        noise = torch.randn(len(batch.prompts), *shape, generator=generator)
        return noise, sample_timesteps(len(batch.prompts), generator, self.cfg.timesteps)

    def batch_loss(self, batch: SFTBatch, key: int, backward: bool, scale: float = 1.0) -> LossTerms:
        """The batch-mean loss terms; with ``backward`` each group's share of ``scale`` x the loss is
        back-propagated as it is computed (one group's graph alive at a time)."""
        noise, t = self.flow_sample(batch, key)
        size = len(batch.prompts)
        sums = None
        for indices in self.groups(batch):
            terms = self.loss(batch.select(indices), noise[indices], t[indices])
            weight = len(indices) / size
            if backward:
                (scale * weight * terms.total).backward()
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
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> StepStats:
    """One optimizer step on ``batch`` with the flow sample drawn from ``key``. A non-finite loss or
    gradient skips the step with a warning instead of corrupting the adapters.

    Data-parallel ranks pass ``total_samples`` (the samples of every rank's batch) and an in-place sum
    ``all_reduce``: each rank's loss counts by its share of all samples, gradients and loss terms are
    summed over ranks before clipping, so every rank takes the step of the mean over all samples (or
    skips it) together; the returned terms are those of all ranks."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    optimizer.zero_grad(set_to_none=True)
    share = len(batch.prompts) / total_samples if total_samples is not None else 1.0
    terms = objective.batch_loss(batch, key, backward=True, scale=share)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if all_reduce is not None:
        sum_gradients(params, all_reduce)
        summed = torch.stack([share * v.detach().double().cpu() for v in terms])
        all_reduce(summed)
        terms = LossTerms(*summed.float())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, objective.cfg.optim.max_grad_norm))
    skipped = not (math.isfinite(grad_norm) and math.isfinite(float(terms.total)))
    if skipped:
        log.warning("non-finite loss %.4g or grad norm %.4g on manifest lines %s: step skipped", float(terms.total), grad_norm, batch.lines)
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return StepStats(terms, grad_norm, skipped)


def make_optimizer(policy: FluxPolicy, cfg: OptimConfig) -> torch.optim.AdamW:
    params = policy.trainable_parameters()
    if not params:
        raise ValueError("the policy has no trainable adapters: enable policy.lora, policy.moe_lora or policy.dual_branch")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2))
