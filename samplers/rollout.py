"""The mixed ODE/SDE rollout of one group (MultiCrafter Algorithm 1, lines 6-14; MixGRPO).

All samples of a group start from the same initial noise; inside the SDE window each sample gets its own
keyed noise, which is what makes them differ. Steps outside the window are deterministic ODE steps run
under ``torch.no_grad``; after the window the ODE tail may use DPM-Solver++(2M) on a compressed schedule
(MixGRPO-Flash). For the window steps the rollout returns what the learner needs to recompute the
log-probs: (step index, sigma, sigma_next, x_t, x_next, log_prob) and the step's eta and reduction, so a
recomputation cannot use other settings than the sampling did.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Sequence

import torch

from samplers.noise import group_noise, sde_noise
from samplers.schedule import compress_schedule
from samplers.steps import Reduce, SDEStep, dpmpp_2m_step, euler_step, sde_step_with_logprob

# velocity(x_t (B, ...) fp32, sigma (B,) fp32) -> v (B, ...): the model with its conditioning bound.
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TailSolver = Literal["euler", "dpmpp_2m"]


def _batch_sigma(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


class GroupKey(NamedTuple):
    """What determines a group's noise: never a worker's rank."""

    seed: int
    iteration: int
    group: int


class WindowTransition(NamedTuple):
    step: int  # schedule index i: the transition goes from sigmas[i] to sigmas[i + 1]
    sigma: float
    sigma_next: float
    x_t: torch.Tensor  # (B, ...) fp32, detached
    x_next: torch.Tensor  # (B, ...) fp32, detached
    log_prob: torch.Tensor  # (B,) fp32 (carries a graph only if the caller enabled grad)
    eta: float  # the SDE noise level the step was sampled with
    reduce: Reduce  # how log_prob was reduced over the latent dims

    def recompute(self, v: torch.Tensor) -> SDEStep:
        """The SDE step from x_t with velocity ``v`` (B, ...), evaluated at the stored x_next: its log_prob
        equals the sampling one for the same v (the ratio-equals-1 property)."""
        return sde_step_with_logprob(self.x_t, v, self.sigma, self.sigma_next, self.eta, reduce=self.reduce, prev_sample=self.x_next)


class Rollout(NamedTuple):
    latents: torch.Tensor  # (B, ...) fp32, the final state at sigma = 0
    transitions: tuple[WindowTransition, ...]  # one per window step, in order


def mixed_rollout(
    velocity: Velocity,
    key: GroupKey,
    latent_shape: Sequence[int],
    sigmas: torch.Tensor,
    window: Sequence[int],
    eta: float,
    *,
    samples: Sequence[int] | int = 1,
    reduce: Reduce = "mean",
    tail_solver: TailSolver = "euler",
    tail_keep_fraction: float = 1.0,
    device: torch.device | str = "cpu",
) -> Rollout:
    """Roll out the samples ``samples`` of group ``key`` (an int n means samples 0..n-1; a list lets a
    worker roll out part of a group and get exactly the numbers it would get in a full batch).

    ``latent_shape`` is one sample's latent shape; ``sigmas`` the (T + 1,) schedule; ``window`` the SDE
    step indices (from ``window_at``); ``eta`` the SDE noise level. The window steps run with the caller's
    grad mode, every other step under no_grad. Steps after the last window step use ``tail_solver`` on the
    schedule compressed to ``tail_keep_fraction`` of its steps.
    """
    num_steps = sigmas.numel() - 1
    window = sorted(set(int(i) for i in window))
    if not window or window[0] < 0 or window[-1] >= num_steps:
        raise ValueError(f"window must be a non-empty set of step indices in [0, {num_steps}), got {window}")
    sample_ids = list(range(samples)) if isinstance(samples, int) else list(samples)
    if not sample_ids:
        raise ValueError("samples must name at least one sample of the group")
    schedule = [float(s) for s in sigmas]

    x = group_noise(key.seed, key.iteration, key.group, latent_shape, device).expand(len(sample_ids), *latent_shape).clone()
    transitions = []
    window_set = set(window)
    for i in range(window[-1] + 1):
        sigma, sigma_next = schedule[i], schedule[i + 1]
        if i in window_set:
            v = velocity(x, _batch_sigma(sigma, x))
            noise = sde_noise(key.seed, key.iteration, key.group, sample_ids, i, latent_shape, x.device)
            step = sde_step_with_logprob(x, v, sigma, sigma_next, eta, noise=noise, reduce=reduce)
            transitions.append(WindowTransition(i, sigma, sigma_next, x.detach(), step.x_next, step.log_prob, eta, reduce))
            x = step.x_next
        else:
            with torch.no_grad():
                x = euler_step(x, velocity(x, _batch_sigma(sigma, x)), sigma, sigma_next)

    tail = compress_schedule(sigmas[window[-1] + 1 :], tail_keep_fraction)
    with torch.no_grad():
        x = ode_solve(velocity, x.detach(), tail, tail_solver)
    return Rollout(x, tuple(transitions))


def ode_solve(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, solver: TailSolver = "euler") -> torch.Tensor:
    """Integrate the probability-flow ODE from sigmas[0] down through every sigma of the schedule."""
    if solver not in ("euler", "dpmpp_2m"):
        raise ValueError(f"solver must be 'euler' or 'dpmpp_2m', got {solver!r}")
    schedule = [float(s) for s in sigmas]
    x0_prev, sigma_prev = None, None
    for sigma, sigma_next in zip(schedule[:-1], schedule[1:]):
        v = velocity(x, _batch_sigma(sigma, x)).float()
        if solver == "euler":
            x = euler_step(x, v, sigma, sigma_next)
        else:
            x0 = x.float() - sigma * v
            x = dpmpp_2m_step(x, x0, sigma, sigma_next, x0_prev, sigma_prev)
            x0_prev, sigma_prev = x0, sigma
    return x
