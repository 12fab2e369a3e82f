"""The SDE step with log-prob (Flow-GRPO form) and the Euler / DPM-Solver++(2M) ODE steps."""

from __future__ import annotations

import math

import pytest
import torch

from gaussian_flow import GaussianFlow
from samplers import dpmpp_2m_step, euler_step, flux_sigmas, ode_solve, sde_step_with_logprob


def _inputs(seed=0, shape=(3, 4, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _reference_mean_std(x, v, sigma, sigma_next, eta):
    """Drift form of the same SDE, written independently of the implementation:
    dx = [v + std_t^2 / (2 sigma) (x + (1 - sigma) v)] dt + std_t dw."""
    dt = sigma_next - sigma
    std_t = eta * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
    return x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt, std_t * math.sqrt(-dt)


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.93), (0.6, 0.5), (0.2, 0.0)])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_equals_torch_normal(sigma, sigma_next, reduce):
    x, v = _inputs()
    step = sde_step_with_logprob(x, v, sigma, sigma_next, eta=0.7, generator=torch.Generator().manual_seed(1), reduce=reduce)
    mean, std = _reference_mean_std(x, v, sigma, sigma_next, 0.7)
    torch.testing.assert_close(step.mean, mean, rtol=1e-5, atol=1e-6)
    assert float(step.std) == pytest.approx(std, rel=1e-6)
    density = torch.distributions.Normal(mean, std).log_prob(step.x_next)
    expected = density.mean(dim=(1, 2)) if reduce == "mean" else density.sum(dim=(1, 2))
    assert step.log_prob.shape == (3,)
    torch.testing.assert_close(step.log_prob, expected, rtol=1e-5, atol=1e-5)


def test_per_sample_sigmas_match_scalar_calls():
    x, v = _inputs()
    sigmas, sigmas_next = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.45, 0.1])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    batched = sde_step_with_logprob(x, v, sigmas, sigmas_next, 0.9, noise=noise)
    for i in range(3):
        single = sde_step_with_logprob(x[i : i + 1], v[i : i + 1], float(sigmas[i]), float(sigmas_next[i]), 0.9, noise=noise[i : i + 1])
        torch.testing.assert_close(batched.x_next[i : i + 1], single.x_next)
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)


def test_empirical_moments_match_mean_and_std():
    x, v = _inputs(shape=(1, 16))
    n = 40_000
    step = sde_step_with_logprob(
        x.expand(n, 16), v.expand(n, 16), 0.7, 0.6, eta=0.7, generator=torch.Generator().manual_seed(7)
    )
    std = float(step.std)
    # 5 standard errors: the mean's is std / sqrt(n); the variance's is about var * sqrt(2 / n).
    torch.testing.assert_close(step.x_next.mean(0), step.mean[0], rtol=0, atol=5 * std / math.sqrt(n))
    torch.testing.assert_close(step.x_next.var(0), torch.full((16,), std**2), rtol=5 * math.sqrt(2 / n), atol=0)


def test_small_eta_mean_is_the_euler_step():
    x, v = _inputs()
    for sigma, sigma_next in [(1.0, 0.9), (0.5, 0.4), (0.1, 0.0)]:
        step = sde_step_with_logprob(x, v, sigma, sigma_next, eta=1e-6, noise=torch.zeros_like(x))
        torch.testing.assert_close(step.mean, euler_step(x, v, sigma, sigma_next), rtol=0, atol=1e-6)
        torch.testing.assert_close(step.x_next, step.mean)


def test_recomputed_log_prob_of_a_stored_transition_is_identical():
    x, v = _inputs()
    sampled = sde_step_with_logprob(x, v, 0.8, 0.7, 0.7, generator=torch.Generator().manual_seed(5))
    v_learner = v.clone().requires_grad_(True)
    scored = sde_step_with_logprob(x, v_learner, 0.8, 0.7, 0.7, prev_sample=sampled.x_next)
    assert torch.equal(scored.log_prob.detach(), sampled.log_prob)  # bit-exact: the GSPO ratio starts at 1
    assert torch.equal(scored.x_next, sampled.x_next)
    scored.log_prob.sum().backward()
    assert v_learner.grad is not None and v_learner.grad.abs().sum() > 0


def test_half_precision_inputs_are_computed_in_fp32():
    x, v = _inputs()
    step = sde_step_with_logprob(x.bfloat16(), v.bfloat16(), 0.8, 0.7, 0.7, noise=torch.zeros_like(x))
    assert step.log_prob.dtype == step.x_next.dtype == torch.float32
    again = sde_step_with_logprob(x.bfloat16(), v.bfloat16(), 0.8, 0.7, 0.7, prev_sample=step.x_next)
    assert torch.equal(again.log_prob, step.log_prob)


def test_sde_preserves_the_marginals_of_the_flow():
    """Sampling every step with the SDE from pure noise, using the exact velocity of Gaussian data,
    must end at the data distribution (the SDE shares the ODE's marginals)."""
    flow = GaussianFlow(mean=1.5, std=0.5)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(20_000, 1, generator=g)
    sigmas = flux_sigmas(64)
    for i in range(64):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x = sde_step_with_logprob(x, flow(x, torch.full((x.shape[0],), s)), s, s_next, eta=0.7, generator=g).x_next
    assert float(x.mean()) == pytest.approx(1.5, abs=0.03)
    assert float(x.std()) == pytest.approx(0.5, abs=0.03)


def test_invalid_arguments_are_rejected():
    x, v = _inputs()
    with pytest.raises(ValueError, match="eta"):
        sde_step_with_logprob(x, v, 0.5, 0.4, eta=0.0)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(x, v, 0.4, 0.5, eta=0.7)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(x, v, torch.tensor([0.5, 0.5, 1.2]), torch.tensor([0.4, 0.4, 0.4]), eta=0.7)
    with pytest.raises(ValueError, match="not both"):
        sde_step_with_logprob(x, v, 0.5, 0.4, 0.7, noise=torch.zeros_like(x), prev_sample=x)
    with pytest.raises(ValueError, match="reduce"):
        sde_step_with_logprob(x, v, 0.5, 0.4, 0.7, reduce="max")
    with pytest.raises(ValueError, match=r"\(3,\) tensor"):
        sde_step_with_logprob(x, v, torch.tensor([0.5, 0.5]), 0.4, 0.7)


def test_dpm_solver_reaches_the_fine_euler_endpoint_in_few_steps():
    flow = GaussianFlow(mean=1.5, std=0.5)
    x_start = torch.randn(256, 4, generator=torch.Generator().manual_seed(2))
    reference = ode_solve(flow, x_start, flux_sigmas(2000, 1024), "euler")
    torch.testing.assert_close(reference, 1.5 + 0.5 * x_start, rtol=0, atol=5e-3)  # the exact ODE endpoint

    def error(num_steps, solver):
        return float((ode_solve(flow, x_start, flux_sigmas(num_steps, 1024), solver) - reference).abs().max())

    assert error(16, "dpmpp_2m") < 0.1 * error(16, "euler")
    assert error(16, "dpmpp_2m") < error(64, "euler")  # a quarter of the model calls, still closer
    assert error(16, "dpmpp_2m") < 0.03


def test_dpm_solver_is_exact_for_a_point_mass():
    """Data at one point x*: x0 = x - sigma v is exact everywhere, so DPM-Solver++ lands on x*."""
    target = torch.tensor([[0.3, -1.2]])

    def point_flow(x, sigma):  # x = (1 - sigma) x* + sigma eps  =>  v = eps - x* = (x - x*) / sigma
        return (x - target) / sigma.view(-1, 1)

    x_start = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    out = ode_solve(point_flow, x_start, flux_sigmas(3, shift=3.0), "dpmpp_2m")
    torch.testing.assert_close(out, target.expand(5, 2), rtol=0, atol=1e-6)


def test_dpm_step_into_zero_returns_the_data_prediction():
    x, x0 = _inputs()
    torch.testing.assert_close(dpmpp_2m_step(x, x0, 0.3, 0.0, x0_prev=x, sigma_prev=0.5), x0)
