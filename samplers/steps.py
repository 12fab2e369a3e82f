"""Single sampler steps for flow matching (FLUX convention: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0).

All functions are stateless. Shapes: ``x`` and ``v`` are (B, ...); a per-sample sigma is a float or a
(B,) tensor and broadcasts over the trailing dims.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

Reduce = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or (B,) tensor as fp32 with shape (B, 1, ..., 1) (or a 0-d tensor for a float)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be a float or a ({like.shape[0]},) tensor, got shape {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
    """ODE (Euler) step: x_next = x + (sigma_next - sigma) v. Computed in fp32, returned in x's dtype."""
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return (x.float() + dt * v.float()).to(x.dtype)


class SDEStep(NamedTuple):
    x_next: torch.Tensor  # (B, ...) fp32: the sampled (or given) next state
    log_prob: torch.Tensor  # (B,) fp32: log N(x_next; mean, std^2) reduced over the non-batch dims
    mean: torch.Tensor  # (B, ...) fp32: the transition mean
    std: torch.Tensor  # 0-d or (B, 1, ..., 1) fp32: std_t * sqrt(-dt), the per-step std of x_next


def sde_step_with_logprob(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    eta: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: Reduce = "mean",
    prev_sample: torch.Tensor | None = None,
) -> SDEStep:
    """One reverse-SDE step of a flow-matching model with its log-probability (Flow-GRPO form, the one
    MixGRPO and MultiCrafter's IPPO use), all in fp32.

    With dt = sigma_next - sigma < 0:
        std_t    = eta * sqrt(sigma / (1 - sigma'))      sigma' = sigma, except sigma' = sigma_next at
                                                        sigma == 1 (the schedule's second value), so the
                                                        first step does not divide by zero
        mean     = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
        x_next   = mean + std_t sqrt(-dt) * noise
        log_prob = log N(x_next; mean, (std_t sqrt(-dt))^2), reduced over all non-batch dims by
                   ``reduce`` ("mean" as Flow-GRPO/MixGRPO do, which sets the scale of GSPO's clip range,
                   or "sum" for the exact joint density).
    As eta -> 0 the mean tends to the Euler step x + dt v.

    Exactly one source of randomness is used: ``prev_sample`` (score a stored transition: the learner's
    path; ``noise`` and ``generator`` must then be None), else ``noise`` (deterministic), else a draw from
    ``generator``. ``x_next`` is always returned detached (it is the action taken); gradients flow into
    ``log_prob`` and ``mean`` through ``v``.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for an SDE step with a log-prob, got {eta} (use euler_step for eta=0)")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if prev_sample is not None and (noise is not None or generator is not None):
        raise ValueError("pass prev_sample (to score a transition) or noise/generator (to sample), not both")

    x32, v32 = x.float(), v.float()
    # Floats stay Python scalars (no tensor ops, no device sync); tensors broadcast as (B, 1, ..., 1).
    s = float(sigma) if not torch.is_tensor(sigma) else _per_sample(sigma, x32)
    s_next = float(sigma_next) if not torch.is_tensor(sigma_next) else _per_sample(sigma_next, x32)
    if torch.is_tensor(s) or torch.is_tensor(s_next):
        # Checking device tensors would stall the GPU every step; CPU tensors are checked.
        valid = x32.device.type != "cpu" or bool(torch.all((0 <= s_next) & (s_next < s) & (s <= 1)))
    else:
        valid = 0 <= s_next < s <= 1
    if not valid:
        raise ValueError(f"need 0 <= sigma_next < sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")
    dt = s_next - s
    s_denominator = s + (s == 1.0) * (s_next - s)  # sigma, or sigma_next where sigma == 1
    std_t = eta * (s / (1.0 - s_denominator)) ** 0.5
    mean = x32 * (1.0 + std_t**2 * dt / (2.0 * s)) + v32 * ((1.0 + std_t**2 * (1.0 - s) / (2.0 * s)) * dt)
    std = torch.as_tensor(std_t * (-dt) ** 0.5, dtype=torch.float32, device=x32.device)

    if prev_sample is not None:
        x_next = prev_sample.detach().float()
    else:
        if noise is None:
            device = generator.device if generator is not None else x32.device
            noise = torch.randn(x32.shape, generator=generator, dtype=torch.float32, device=device).to(x32.device)
        x_next = mean + std * noise.float()

    # log N(x_next; mean, std^2) per element is -(x_next - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi));
    # reducing the squared error first is the same sum with fewer full-size ops.
    dims = tuple(range(1, x32.ndim))
    squared_error = (x_next.detach() - mean).square()
    if reduce == "mean":
        squared_error, count = squared_error.mean(dim=dims), 1
    else:
        squared_error, count = squared_error.sum(dim=dims), math.prod(x32.shape[1:])
    std_b = std.reshape(-1) if std.ndim else std
    log_prob = -squared_error / (2.0 * std_b**2) - count * (torch.log(std_b) + _LOG_SQRT_2PI)
    return SDEStep(x_next.detach(), log_prob, mean, std)


def dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    sigma: float,
    sigma_next: float,
    x0_prev: torch.Tensor | None = None,
    sigma_prev: float | None = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step (data prediction, multistep) for flow matching, in fp32.

    With alpha = 1 - sigma and lambda = log(alpha / sigma), h = lambda_next - lambda:
        first order:  x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) x0
                            = alpha_next x0 + sigma_next (x - alpha x0) / sigma
        second order (given x0_prev at sigma_prev): x0 is replaced by
                      D = (1 + 1 / (2 r)) x0 - 1 / (2 r) x0_prev,   r = (lambda - lambda_prev) / h.
    ``x0`` is the model's data prediction at sigma (x0 = x - sigma v). The step into sigma_next = 0 is first
    order (it returns x0 exactly), like diffusers' ``lower_order_final``.
    """
    x32, x0_32 = x.float(), x0.float()
    data = x0_32
    # lambda is -inf at sigma = 1 and +inf at sigma = 0: the multistep correction is then dropped.
    if x0_prev is not None and sigma_prev is not None and sigma_prev < 1 and sigma_next > 0:
        lam = math.log((1 - sigma) / sigma)
        h = math.log((1 - sigma_next) / sigma_next) - lam
        r = (lam - math.log((1 - sigma_prev) / sigma_prev)) / h
        data = (1 + 1 / (2 * r)) * x0_32 - (1 / (2 * r)) * x0_prev.float()
    alpha, alpha_next = 1.0 - sigma, 1.0 - sigma_next
    # Written without e^{-h} so that sigma_next = 0 (lambda = inf) needs no special case.
    return alpha_next * data + (sigma_next / sigma) * (x32 - alpha * data)
