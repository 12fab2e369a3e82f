"""The policy update: on-policy ratio, what changes, fault handling, and that it learns."""

from __future__ import annotations

import pytest
import torch

from gaussian_flow import GaussianFlow
from rl_align.ippo.advantages import group_advantages
from rl_align.core.optim import make_optimizer
from rl_align.ippo.learner import GroupTransitions, LearnerConfig, policy_update
from samplers import GroupKey, flux_sigmas, mixed_rollout

SIGMAS = flux_sigmas(8)
SHAPE = (4,)


class ToyPolicy(torch.nn.Module):
    """A frozen base velocity (exact flow of Gaussian data) plus a trainable additive adapter."""

    def __init__(self):
        super().__init__()
        self.flow = GaussianFlow(mean=0.0, std=1.0)
        self.base_scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.adapter = torch.nn.Parameter(torch.zeros(SHAPE))

    def forward(self, x, sigma):
        return self.base_scale * self.flow(x, sigma) + self.adapter


def rollout_chunks(policy, iteration, groups=2, group_size=8, window=(2, 3)):
    chunks, finals = [], []
    with torch.no_grad():
        for g in range(groups):
            out = mixed_rollout(policy, GroupKey(0, iteration, g), SHAPE, SIGMAS, window, eta=0.9, samples=group_size)
            finals.append(out.latents)
            chunks.append(out.transitions)
    rewards = torch.cat(finals).mean(dim=1)  # reward: the mean of the final latent
    group_ids = torch.arange(groups).repeat_interleave(group_size)
    adv = group_advantages(rewards, group_ids)
    return [GroupTransitions(g, chunks[g], adv[group_ids == g]) for g in range(groups)], rewards


def test_first_update_is_on_policy_and_only_adapters_change():
    policy = ToyPolicy()
    chunks, _ = rollout_chunks(policy, 0)
    opt = make_optimizer([policy.adapter], LearnerConfig(learning_rate=1e-2))
    stats = policy_update(chunks, lambda g: policy, opt, LearnerConfig())
    assert stats.ratio_mean == pytest.approx(1.0, abs=1e-6) and stats.clip_fraction == 0.0 and not stats.skipped
    assert policy.base_scale.item() == 1.0 and policy.adapter.abs().sum() > 0


def test_non_finite_loss_skips_the_step(caplog):
    policy = ToyPolicy()
    chunks, _ = rollout_chunks(policy, 0)
    opt = make_optimizer([policy.adapter], LearnerConfig())
    with torch.no_grad():
        policy.base_scale.fill_(float("nan"))
    stats = policy_update(chunks, lambda g: policy, opt, LearnerConfig())
    assert stats.skipped and "non-finite loss (policy update): step skipped" in caplog.text
    assert torch.equal(policy.adapter, torch.zeros(SHAPE))


def test_gradients_are_clipped():
    policy = ToyPolicy()
    chunks, _ = rollout_chunks(policy, 0)
    cfg = LearnerConfig(max_grad_norm=1e-3)
    opt = torch.optim.SGD([policy.adapter], lr=1.0)
    stats = policy_update(chunks, lambda g: policy, opt, cfg)
    assert stats.grad_norm > 1e-3  # the raw norm is reported...
    assert float(policy.adapter.detach().norm()) == pytest.approx(1e-3, rel=1e-4)  # ...the step used the clipped one


def test_kl_to_the_reference_policy():
    policy, reference = ToyPolicy(), ToyPolicy()
    chunks, _ = rollout_chunks(policy, 0)
    cfg = LearnerConfig(learning_rate=0.1, kl_beta=1.0)
    opt = make_optimizer([policy.adapter], cfg)
    first = policy_update(chunks, lambda g: policy, opt, cfg, reference_of=lambda g: reference)
    assert first.kl == 0.0  # identical to the reference before the first step
    second = policy_update(chunks, lambda g: policy, opt, cfg, reference_of=lambda g: reference)
    assert second.kl > 0


@pytest.mark.parametrize("algorithm", ["gspo", "grpo"])
def test_rewards_rise(algorithm):
    torch.manual_seed(0)
    policy = ToyPolicy()
    cfg = LearnerConfig(algorithm=algorithm, learning_rate=3e-2, clip_low=2e-3, clip_high=2e-3)
    opt = make_optimizer([policy.adapter], cfg)
    curve, clip_fractions = [], []
    for iteration in range(40):
        chunks, rewards = rollout_chunks(policy, iteration)
        curve.append(float(rewards.mean()))
        # Two steps per rollout: the second is off-policy, where the ratio and its clipping act.
        for _ in range(2):
            clip_fractions.append(policy_update(chunks, lambda g: policy, opt, cfg).clip_fraction)
    assert sum(curve[-8:]) / 8 > sum(curve[:8]) / 8 + 0.3
    assert max(clip_fractions[1::2]) > 0 and max(clip_fractions[0::2]) == 0
