"""GSPO / per-step GRPO losses against trl's GRPOTrainer, their gradients, and the KL term."""

from __future__ import annotations

import collections
import types

import pytest
import torch
from accelerate import Accelerator
from trl import GRPOTrainer

from rl_align.ippo.losses import gspo_loss
from rl_align.ippo.losses import gaussian_mean_kl, grpo_step_objective, gspo_objective


def trl_reference_loss(logp_new, logp_old, advantages, clip_low, clip_high, level):
    """trl's own GRPOTrainer._compute_loss (loss_type "grpo"), with the window steps as the completion
    tokens: level "sequence" is GSPO, "token" is per-step GRPO. Only the model call is replaced, by the
    given log-probs; the loss arithmetic is trl's."""
    batch, steps = logp_new.shape
    trainer = types.SimpleNamespace(
        importance_sampling_level=level, loss_type="grpo", epsilon_low=clip_low, epsilon_high=clip_high, beta=0.0,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, model=torch.nn.Linear(1, 1),
        accelerator=Accelerator(cpu=True), args=types.SimpleNamespace(delta=None),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp_new, torch.zeros(batch, steps), None),
    )
    inputs = dict(
        prompt_ids=torch.zeros(batch, 1, dtype=torch.long), prompt_mask=torch.ones(batch, 1, dtype=torch.long),
        completion_ids=torch.zeros(batch, steps, dtype=torch.long), completion_mask=torch.ones(batch, steps),
        advantages=advantages, old_per_token_logps=logp_old,
    )
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def _batch(seed, batch=8, steps=3, drift=0.02):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(batch, steps, generator=g) - 1.0
    return old + drift * torch.randn(batch, steps, generator=g), old, torch.randn(batch, generator=g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clip_low, clip_high", [(1e-3, 1e-3), (3e-3, 4e-3), (0.2, 0.28)])
def test_gspo_matches_trl_sequence_level(seed, clip_low, clip_high):
    new, old, adv = _batch(seed)
    expected = trl_reference_loss(new, old, adv, clip_low, clip_high, "sequence")
    torch.testing.assert_close(gspo_loss(new, old, adv, clip_low, clip_high), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("seed", range(3))
def test_per_step_grpo_matches_trl_token_level(seed):
    new, old, adv = _batch(seed)
    expected = trl_reference_loss(new, old, adv, 5e-3, 5e-3, "token")
    torch.testing.assert_close(grpo_step_objective(new, old, adv, 5e-3, 5e-3).loss, expected, rtol=1e-6, atol=1e-7)


def test_gspo_matches_a_scalar_loop():
    new, old, adv = _batch(11, batch=5, steps=4, drift=0.01)
    terms = []
    for i in range(5):
        s = float(torch.exp(sum(new[i] - old[i]) / 4))
        terms.append(min(s * float(adv[i]), min(max(s, 1 - 4e-3), 1 + 6e-3) * float(adv[i])))
    assert float(gspo_loss(new, old, adv, 4e-3, 6e-3)) == pytest.approx(-sum(terms) / 5, rel=1e-6)


def test_gradient_at_ratio_one_is_the_policy_gradient():
    """With logp_theta == logp_old the ratio is 1 and d(-J)/d logp_theta(i, t) = -A_i / (B W)."""
    _, old, adv = _batch(3, batch=6, steps=2)
    new = old.clone().requires_grad_(True)
    out = gspo_objective(new, old, adv, 1e-3, 1e-3)
    assert torch.equal(out.ratio, torch.ones(6)) and not out.clipped.any()
    out.loss.backward()
    torch.testing.assert_close(new.grad, (-adv / 12)[:, None].expand(6, 2), rtol=1e-6, atol=0)


def test_clipping_stops_the_gradient_outside_the_band():
    old = torch.zeros(4, 2)
    # log-ratio means: +0.01 (s > 1 + eps), -0.01 (s < 1 - eps), +0.01, -0.01 with eps = 1e-3
    new = torch.tensor([[0.01, 0.01], [-0.01, -0.01], [0.01, 0.01], [-0.01, -0.01]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    out = gspo_objective(new, old, adv, 1e-3, 1e-3)
    out.loss.backward()
    # Samples 0 and 1 moved too far in the direction their advantage rewards: clipped, no gradient.
    assert out.clipped.tolist() == [True, True, False, False]
    assert torch.all(new.grad[:2] == 0)
    # Samples 2 and 3 moved the wrong way: the unclipped term is the minimum and keeps its gradient.
    assert torch.all(new.grad[2:] != 0)


def test_shape_errors_name_the_argument():
    new, old, adv = _batch(0)
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(new, old, adv[:3], 1e-3, 1e-3)
    with pytest.raises(ValueError, match=r"\(B, W\)"):
        gspo_loss(new[:, 0], old[:, 0], adv, 1e-3, 1e-3)
    with pytest.raises(ValueError, match="clip_low"):
        gspo_loss(new, old, adv, 1.5, 1e-3)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_gaussian_mean_kl_matches_torch_distributions(reduce):
    g = torch.Generator().manual_seed(0)
    mean, mean_ref = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(mean_ref, std))
    expected = kl.mean(dim=(1, 2)) if reduce == "mean" else kl.sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_mean_kl(mean, mean_ref, std, reduce), expected, rtol=1e-5, atol=1e-6)
