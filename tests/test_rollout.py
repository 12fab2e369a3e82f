"""The mixed ODE/SDE rollout loop and its keyed noise."""

from __future__ import annotations

import itertools

import pytest
import torch

from gaussian_flow import GaussianFlow
from samplers import GroupKey, flux_sigmas, group_noise, mixed_rollout, sde_noise, sde_step_with_logprob

SHAPE = (16, 4)  # one sample's latent: 16 tokens x 4 channels


def test_group_noise_is_keyed_and_distinct():
    assert torch.equal(group_noise(0, 3, 5, SHAPE), group_noise(0, 3, 5, SHAPE))
    noises = {(seed, it, g): group_noise(seed, it, g, SHAPE) for seed, it, g in itertools.product(range(2), range(4), range(25))}
    flat = torch.stack([n.flatten() for n in noises.values()])
    correlation = torch.corrcoef(flat) - torch.eye(len(noises))
    assert correlation.abs().max() < 0.6  # 64 values each: independent draws, no two alike
    assert len({tuple(n.flatten().tolist()) for n in noises.values()}) == len(noises)


class CountingVelocity:
    """The Gaussian-data velocity, plus a learnable scale so the window steps can carry a graph;
    records the grad mode of each call."""

    def __init__(self):
        self.flow = GaussianFlow(mean=0.8, std=0.6)
        self.scale = torch.ones((), requires_grad=True)
        self.grad_modes: list[bool] = []

    def __call__(self, x, sigma):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.scale * self.flow(x, sigma)


def test_window_transitions_and_grad_modes():
    velocity, sigmas = CountingVelocity(), flux_sigmas(8, 16)
    out = mixed_rollout(velocity, GroupKey(0, 0, 0), SHAPE, sigmas, window=[3, 4], eta=0.7, samples=4)
    assert out.latents.shape == (4, *SHAPE) and torch.isfinite(out.latents).all()
    assert [t.step for t in out.transitions] == [3, 4]
    assert velocity.grad_modes == [False, False, False, True, True, False, False, False]
    assert all(t.log_prob.requires_grad and t.log_prob.shape == (4,) for t in out.transitions)
    assert torch.equal(out.transitions[0].x_next, out.transitions[1].x_t)  # one chain
    assert [(t.sigma, t.sigma_next) for t in out.transitions] == [(float(sigmas[i]), float(sigmas[i + 1])) for i in (3, 4)]
    # Before the window every sample followed the same ODE path from the same noise; inside it they split.
    first = out.transitions[0].x_t
    assert torch.equal(first, first[:1].expand_as(first))
    assert not torch.equal(out.transitions[0].x_next[0], out.transitions[0].x_next[1])


def test_learner_recomputes_the_rollout_log_probs_exactly():
    velocity, sigmas = CountingVelocity(), flux_sigmas(8, 16)
    with torch.no_grad():
        out = mixed_rollout(velocity, GroupKey(1, 9, 2), SHAPE, sigmas, window=[0, 1], eta=0.9, samples=3)
    for t in out.transitions:
        v = velocity(t.x_t, torch.full((3,), t.sigma))
        again = sde_step_with_logprob(t.x_t, v, t.sigma, t.sigma_next, 0.9, prev_sample=t.x_next)
        assert torch.equal(again.log_prob.detach(), t.log_prob)  # ratio exp(0) = 1 before any update
        assert again.log_prob.requires_grad


def test_part_of_a_group_gives_the_same_numbers_as_the_whole():
    velocity, sigmas = CountingVelocity(), flux_sigmas(8, 16)
    with torch.no_grad():
        whole = mixed_rollout(velocity, GroupKey(0, 4, 1), SHAPE, sigmas, [2, 3], 0.7, samples=6)
        part = mixed_rollout(velocity, GroupKey(0, 4, 1), SHAPE, sigmas, [2, 3], 0.7, samples=[4, 1])
    torch.testing.assert_close(part.latents, whole.latents[[4, 1]], rtol=0, atol=1e-6)
    torch.testing.assert_close(part.transitions[1].log_prob, whole.transitions[1].log_prob[[4, 1]], rtol=0, atol=1e-6)


def test_groups_and_iterations_get_different_rollouts():
    velocity, sigmas = CountingVelocity(), flux_sigmas(8, 16)
    with torch.no_grad():
        a = mixed_rollout(velocity, GroupKey(0, 0, 0), SHAPE, sigmas, [0, 1], 0.7, samples=2).latents
        b = mixed_rollout(velocity, GroupKey(0, 0, 1), SHAPE, sigmas, [0, 1], 0.7, samples=2).latents
        c = mixed_rollout(velocity, GroupKey(0, 1, 0), SHAPE, sigmas, [0, 1], 0.7, samples=2).latents
        a_again = mixed_rollout(velocity, GroupKey(0, 0, 0), SHAPE, sigmas, [0, 1], 0.7, samples=2).latents
    assert torch.equal(a, a_again)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_flash_tail_uses_fewer_model_calls_and_lands_close():
    sigmas = flux_sigmas(16, 16)
    full_velocity, flash_velocity = CountingVelocity(), CountingVelocity()
    with torch.no_grad():
        full = mixed_rollout(full_velocity, GroupKey(0, 0, 0), SHAPE, sigmas, [0, 1], 0.7, samples=2)
        flash = mixed_rollout(
            flash_velocity, GroupKey(0, 0, 0), SHAPE, sigmas, [0, 1], 0.7, samples=2, tail_solver="dpmpp_2m", tail_keep_fraction=0.5
        )
    assert len(full_velocity.grad_modes) == 16 and len(flash_velocity.grad_modes) == 2 + 7
    assert torch.equal(full.transitions[1].x_next, flash.transitions[1].x_next)
    # The exact ODE endpoint from the state after the window (Gaussian data: x_t = (1 - t) m + sqrt(var_t) z).
    flow, last = full_velocity.flow, full.transitions[1]
    t = last.sigma_next
    z = (last.x_next - (1 - t) * flow.mean) / ((1 - t) ** 2 * flow.std**2 + t**2) ** 0.5
    exact = flow.mean + flow.std * z
    flash_error, full_error = (flash.latents - exact).abs().max(), (full.latents - exact).abs().max()
    assert flash_error < full_error  # half the model calls of the Euler tail, and still closer
    with torch.no_grad():
        euler_half = mixed_rollout(CountingVelocity(), GroupKey(0, 0, 0), SHAPE, sigmas, [0, 1], 0.7, samples=2, tail_keep_fraction=0.5)
    assert flash_error < 0.5 * (euler_half.latents - exact).abs().max()  # same calls, DPM-Solver++ far closer


def test_invalid_rollout_arguments():
    velocity, sigmas = CountingVelocity(), flux_sigmas(4)
    with pytest.raises(ValueError, match="window"):
        mixed_rollout(velocity, GroupKey(0, 0, 0), SHAPE, sigmas, [], 0.7)
    with pytest.raises(ValueError, match="window"):
        mixed_rollout(velocity, GroupKey(0, 0, 0), SHAPE, sigmas, [4], 0.7)
    with pytest.raises(ValueError, match="samples"):
        mixed_rollout(velocity, GroupKey(0, 0, 0), SHAPE, sigmas, [0], 0.7, samples=[])


def test_sde_noise_is_keyed_by_every_part_of_its_key():
    """Dropping any key part (the seed, iteration, group, sample or step) would repeat noise."""
    base = dict(seed=0, iteration=3, group=1, samples=[2], step=4)
    reference = sde_noise(shape=SHAPE, **base)
    assert torch.equal(reference, sde_noise(shape=SHAPE, **base))
    for part, other in (("seed", 1), ("iteration", 4), ("group", 2), ("samples", [3]), ("step", 5)):
        changed = sde_noise(shape=SHAPE, **{**base, part: other})
        assert not torch.allclose(changed, reference), part
    assert not torch.allclose(sde_noise(shape=SHAPE, **base), group_noise(0, 3, 1, SHAPE)[None])  # SDE and initial noise differ too
