"""Group-relative advantages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_align.ippo.advantages import group_advantages, weighted_component_advantages


def _reference(rewards, groups, eps, clip):
    out = np.zeros(len(rewards))
    for g in set(groups):
        idx = [i for i, label in enumerate(groups) if label == g]
        values = np.array([rewards[i] for i in idx], dtype=np.float64)
        out[idx] = np.clip((values - values.mean()) / (values.std() + eps), -clip, clip)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_per_group_reference(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 4, size=24)
    rewards = rng.normal(size=24) * rng.uniform(0.01, 3)
    got = group_advantages(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups))
    np.testing.assert_allclose(got.numpy(), _reference(rewards, list(groups), 1e-4, 5.0), rtol=1e-4, atol=1e-5)


def test_zero_spread_single_sample_and_clipping():
    rewards = torch.tensor([2.0, 2.0, 2.0, 7.0, 0.0] + [0.0] * 99 + [1.0])
    groups = torch.tensor([0, 0, 0, 1] + [2] * 101)
    adv = group_advantages(rewards, groups)
    assert torch.equal(adv[:4], torch.zeros(4))  # zero spread and a group of one give zeros, never NaN
    assert adv[-1] == 5.0  # one outlier among 101 is ~10 std away: clipped to +5
    assert torch.isfinite(adv).all()
    low = group_advantages(-rewards, groups)
    assert low[-1] == -5.0  # the lower clip binds the same way
    assert torch.allclose(low[4:-1], -adv[4:-1])  # unclipped members are untouched


def test_non_finite_rewards_are_reported():
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        group_advantages(torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0, 0, 0]))


def test_component_normalization_balances_scales():
    groups = torch.tensor([0, 0, 0, 0])
    components = {"id": torch.tensor([0.0, 0.01, 0.02, 0.03]), "text": torch.tensor([300.0, 200.0, 100.0, 0.0])}
    adv = weighted_component_advantages(components, {"id": 1.0, "text": 1.0}, groups, eps=1e-8)
    torch.testing.assert_close(adv, torch.zeros(4), atol=1e-4, rtol=0)  # equal weight, opposite order: cancel
    single = weighted_component_advantages(components, {"id": 0.5, "text": 0.0}, groups)
    torch.testing.assert_close(single, 0.5 * group_advantages(components["id"], groups))
    with pytest.raises(ValueError, match=r"no weight for reward components \['text'\]"):
        weighted_component_advantages(components, {"id": 1.0}, groups)
