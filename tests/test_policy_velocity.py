"""The velocity the samplers call: batch-size invariance (the RL ratio must be exactly 1 before the first
update), the samplers' contract, and the Dice loss of MultiCrafter Eq. 5."""

from __future__ import annotations

import pytest
import torch

from policies import AttentionSwitches, dice_loss
from samplers import GroupKey, flux_sigmas, mixed_rollout, sde_step_with_logprob
from policy_helpers import conditioning, latents, randomize_adapters, tiny_policy


@pytest.fixture(scope="module")
def policy():
    policy = tiny_policy()
    randomize_adapters(policy)
    return policy


@pytest.mark.parametrize(
    "switches",
    [AttentionSwitches(), AttentionSwitches(static_routing=True, dynamic_routing=True, temperature=True, capture=True)],
    ids=["plain", "all-features"],
)
def test_velocity_is_batch_size_invariant(policy, switches):
    cond = conditioning(policy, prompts=["a cat and a dog on the grass"])
    velocity = policy.velocity_fn(cond, switches)
    x = latents(policy, 5, seed=3)
    sigma = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.05])
    with torch.no_grad():
        together = velocity(x, sigma)
        alone = torch.cat([velocity(x[i : i + 1], sigma[i : i + 1]) for i in range(5)])
        reordered = velocity(x.flip(0), sigma.flip(0)).flip(0)
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(reordered, together, rtol=0, atol=1e-5)


def test_broadcast_conditioning_equals_per_sample_conditioning(policy):
    prompts = ["a cat and a dog on the grass"] * 2
    shared, repeated = conditioning(policy, prompts=prompts[:1]), conditioning(policy, prompts=prompts)
    x, sigma = latents(policy, 2), torch.tensor([0.6, 0.6])
    with torch.no_grad():
        torch.testing.assert_close(policy.velocity_fn(shared)(x, sigma), policy.velocity_fn(repeated)(x, sigma), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_rollout_log_probs_recompute_to_ratio_one(policy):
    cond = conditioning(policy, prompts=["a cat and a dog on the grass"])
    velocity = policy.velocity_fn(cond)
    shape = policy.latent_shape(32, 32)
    sigmas = flux_sigmas(6, image_seq_len=cond.layout.noisy)
    with torch.no_grad():
        rollout = mixed_rollout(velocity, GroupKey(0, 0, 0), shape, sigmas, window=[1, 2], eta=0.7, samples=4)
    assert rollout.latents.shape == (4, *shape) and torch.isfinite(rollout.latents).all()
    for step in rollout.transitions:  # the learner's recomputation, in a different batch split
        for part in (slice(0, 1), slice(1, 4)):
            v = velocity(step.x_t[part], torch.full((step.x_t[part].shape[0],), step.sigma))
            again = sde_step_with_logprob(step.x_t[part], v, step.sigma, step.sigma_next, 0.7, prev_sample=step.x_next[part])
            ratio = torch.exp(again.log_prob - step.log_prob[part])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6)


def test_dice_loss_equals_eq5_by_hand():
    pred = torch.tensor([[[0.5, 1.0, 0.0], [0.2, 0.2, 0.2]], [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]])
    target = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])
    # sample 0: 1 - (2*1.5+1)/(1.5+2+1) = 1 - 4/4.5 ; 1 - (2*0.2+1)/(0.6+1+1) = 1 - 1.4/2.6
    # sample 1: 1 - (2*3+1)/(3+3+1) = 0 ; 1 - (0+1)/(1+1+1) = 2/3
    expected = ((1 - 4 / 4.5) + (1 - 1.4 / 2.6) + 0.0 + 2 / 3) / 2
    torch.testing.assert_close(dice_loss(pred, target), torch.tensor(expected))
    assert dice_loss(target, target) < dice_loss(pred, target)
    with pytest.raises(ValueError, match=r"\(B, N, L\)"):
        dice_loss(pred[0], target[0])
