"""The policy update: on-policy ratio, what changes, fault handling, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from gaussian_flow import GaussianFlow
from rl_align.ippo.advantages import group_advantages
from rl_align.core.optim import make_optimizer
from rl_align.ippo.learner import GroupTransitions, LearnerConfig, minibatch_plan, policy_update
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


# ---- what a realistic bug would break -------------------------------------------------------------------


def _sgd_delta(policy, chunks, cfg, reference=None):
    """The parameter change of one plain SGD step of lr 1 (Adam's scale invariance would hide weights)."""
    before = policy.adapter.detach().clone()
    opt = torch.optim.SGD([policy.adapter], lr=1.0)
    stats = policy_update(chunks, lambda g: policy, opt, cfg, reference_of=(lambda g: reference) if reference is not None else None)
    delta = policy.adapter.detach() - before
    with torch.no_grad():
        policy.adapter.copy_(before)
    return delta, stats


def _split(chunk, at):
    """Two chunks holding the samples [:at] and [at:] of ``chunk``."""
    def part(index):
        transitions = tuple(t._replace(x_t=t.x_t[index], x_next=t.x_next[index], log_prob=t.log_prob[index]) for t in chunk.transitions)
        return GroupTransitions(chunk.group, transitions, chunk.advantages[index])
    return part(slice(0, at)), part(slice(at, None))


def test_each_chunk_counts_by_its_share_of_the_samples():
    policy = ToyPolicy()
    chunks, _ = rollout_chunks(policy, 0)
    cfg = LearnerConfig(max_grad_norm=1e6)
    whole, _ = _sgd_delta(policy, chunks, cfg)
    uneven = [*_split(chunks[0], 2), *_split(chunks[1], 7)]  # chunks of 2, 6, 7 and 1 samples
    split, _ = _sgd_delta(policy, uneven, cfg)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-8)
    assert whole.abs().max() > 1e-4  # a real step, not a trivially equal zero


def test_a_finite_loss_with_a_non_finite_gradient_does_not_step(caplog):
    policy = ToyPolicy()
    chunks, _ = rollout_chunks(policy, 0)
    policy.adapter.register_hook(lambda grad: grad * float("inf"))
    opt = make_optimizer([policy.adapter], LearnerConfig())
    stats = policy_update(chunks, lambda g: policy, opt, LearnerConfig())
    assert stats.skipped and not math.isfinite(stats.grad_norm) and "non-finite gradient norm" in caplog.text
    assert torch.equal(policy.adapter, torch.zeros(SHAPE)) and not opt.state  # no step, no Adam moments


def test_kl_is_the_step_mean_of_the_gaussian_kl_and_pulls_towards_the_reference():
    policy, reference = ToyPolicy(), ToyPolicy()
    with torch.no_grad():
        policy.adapter.fill_(0.3)
    chunks, _ = rollout_chunks(policy, 0)
    zero = [c._replace(advantages=torch.zeros_like(c.advantages)) for c in chunks]  # only the KL term acts
    cfg = LearnerConfig(kl_beta=1.0, max_grad_norm=1e6)
    expected = []
    for chunk in zero:
        per_step = []
        for t in chunk.transitions:
            sigma = torch.full((t.x_t.shape[0],), t.sigma)
            mine, theirs = t.recompute(policy(t.x_t, sigma)), t.recompute(reference(t.x_t, sigma))
            kl = torch.distributions.kl_divergence(Normal(mine.mean, mine.std), Normal(theirs.mean, theirs.std))
            per_step.append(kl.mean(dim=1))  # reduced over the latent dims as the log-probs ("mean")
        expected.append(torch.stack(per_step, 1).mean(1))  # averaged over the window steps
    delta, stats = _sgd_delta(policy, zero, cfg, reference)
    assert stats.kl == pytest.approx(float(torch.cat(expected).mean().detach()), rel=1e-5)
    assert (delta * policy.adapter.detach()).sum() < 0  # the step moves the adapter back towards the reference (0)


def _objective_by_hand(policy, chunks, cfg):
    """-J of GSPO or per-step GRPO written out sample by sample (the independent computation)."""
    terms = []
    for chunk in chunks:
        for i in range(len(chunk.advantages)):
            log_ratios = []
            for t in chunk.transitions:
                one = t._replace(x_t=t.x_t[i : i + 1], x_next=t.x_next[i : i + 1])
                new = one.recompute(policy(one.x_t, torch.full((1,), t.sigma))).log_prob[0]
                log_ratios.append(new - t.log_prob[i])
            a = float(chunk.advantages[i])
            ratios = [torch.exp(torch.stack(log_ratios).mean())] if cfg.algorithm == "gspo" else [torch.exp(r) for r in log_ratios]
            per_ratio = [torch.minimum(r * a, r.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * a) for r in ratios]
            terms.append(torch.stack(per_ratio).mean())
    return -torch.stack(terms).mean()


def _gradient_by_hand(policy, chunks, cfg):
    policy.adapter.grad = None
    _objective_by_hand(policy, chunks, cfg).backward()
    grad = policy.adapter.grad.clone()
    policy.adapter.grad = None
    return grad


def test_gspo_and_grpo_agree_on_policy_and_differ_off_policy():
    policy = ToyPolicy()
    chunks, _ = rollout_chunks(policy, 0)
    gspo, grpo = LearnerConfig(algorithm="gspo", max_grad_norm=1e6, clip_low=0.2, clip_high=0.2), LearnerConfig(algorithm="grpo", max_grad_norm=1e6, clip_low=0.2, clip_high=0.2)
    on_gspo, on_grpo = _sgd_delta(policy, chunks, gspo)[0], _sgd_delta(policy, chunks, grpo)[0]
    torch.testing.assert_close(on_gspo, on_grpo, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(on_gspo, -_gradient_by_hand(policy, chunks, gspo), rtol=1e-4, atol=1e-7)

    with torch.no_grad():
        policy.adapter.add_(torch.tensor([0.05, -0.03, 0.02, 0.04]))  # the policy after an earlier step
    off_gspo, off_grpo = _sgd_delta(policy, chunks, gspo)[0], _sgd_delta(policy, chunks, grpo)[0]
    torch.testing.assert_close(off_gspo, -_gradient_by_hand(policy, chunks, gspo), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(off_grpo, -_gradient_by_hand(policy, chunks, grpo), rtol=1e-4, atol=1e-7)
    assert (off_gspo - off_grpo).abs().max() > 1e-3 * off_gspo.abs().max()


def test_a_clipped_sample_gives_no_gradient_and_an_unclipped_one_the_analytic_one():
    policy = ToyPolicy()
    chunks, _ = rollout_chunks(policy, 0, groups=1)
    with torch.no_grad():
        policy.adapter.add_(0.2)  # off-policy: some ratios now leave a narrow band
    cfg = LearnerConfig(max_grad_norm=1e6, clip_low=1e-3, clip_high=1e-3)
    (chunk,) = chunks
    singles = [GroupTransitions(0, tuple(t._replace(x_t=t.x_t[i : i + 1], x_next=t.x_next[i : i + 1], log_prob=t.log_prob[i : i + 1])
                                              for t in chunk.transitions), chunk.advantages[i : i + 1]) for i in range(len(chunk.advantages))]
    clipped_seen = unclipped_seen = False
    for single in singles:
        delta, stats = _sgd_delta(policy, [single], cfg)
        if stats.clip_fraction == 1.0:
            clipped_seen = True
            assert torch.equal(delta, torch.zeros(SHAPE))
        else:
            unclipped_seen = True
            # d/dθ of -s A with s = exp(mean_t (logp_t - logp_old_t)): -A s mean_t d logp_t / dθ
            policy.adapter.grad = None
            logp = torch.stack([t.recompute(policy(t.x_t, torch.full((1,), t.sigma))).log_prob[0] for t in single.transitions])
            s = torch.exp((logp - torch.stack([t.log_prob[0] for t in single.transitions])).mean()).detach()
            logp.mean().backward()
            analytic = float(single.advantages[0]) * s * policy.adapter.grad  # -gradient of the loss
            policy.adapter.grad = None
            torch.testing.assert_close(delta, analytic, rtol=1e-4, atol=1e-8)
    assert clipped_seen and unclipped_seen


def test_minibatch_plan_takes_whole_groups_in_a_seeded_order():
    chunk_groups = [0, 0, 1, 1, 2, 2, 3, 3]  # 4 groups of 2 chunks
    plan = minibatch_plan(chunk_groups, minibatches=2, epochs=2, seed=0, iteration=5)
    assert len(plan) == 4 and plan == minibatch_plan(chunk_groups, 2, 2, 0, 5)  # resume replays it
    for epoch in (plan[:2], plan[2:]):
        assert sorted(j for minibatch in epoch for j in minibatch) == list(range(8))  # each chunk once per epoch
        for minibatch in epoch:
            groups = [chunk_groups[j] for j in minibatch]
            assert len(minibatch) == 4 and all(groups.count(g) == 2 for g in set(groups))  # whole groups
    orders = {tuple(map(tuple, minibatch_plan(chunk_groups, 2, 1, 0, it))) for it in range(12)}
    assert len(orders) > 1  # the order depends on the iteration


def test_minibatch_plan_splits_a_group_larger_than_a_minibatch():
    plan = minibatch_plan([0, 0, 0, 0, 1, 1, 1, 1], minibatches=4, epochs=1, seed=0, iteration=0)
    assert sorted(map(tuple, plan)) == [(0, 1), (2, 3), (4, 5), (6, 7)]  # consecutive chunks of one group
    with pytest.raises(ValueError, match="minibatches=3"):
        minibatch_plan([0, 0, 1, 1], 3, 1, 0, 0)
