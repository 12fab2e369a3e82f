"""Flow-matching samplers for RL: schedules, ODE/SDE steps with log-probs, the SDE window and the mixed
rollout loop. Depends on torch only."""

from samplers.config import SamplerConfig
from samplers.noise import group_noise, key_seed, keyed_normal, sde_noise
from samplers.rollout import GroupKey, Rollout, Velocity, WindowTransition, mixed_rollout, ode_solve
from samplers.schedule import calculate_shift, compress_schedule, exponential_time_shift, flux_sigmas, static_time_shift
from samplers.steps import SDEStep, dpmpp_2m_step, euler_step, sde_step_with_logprob
from samplers.window import random_window_at, window_at, window_start

__all__ = [
    "GroupKey",
    "Rollout",
    "SDEStep",
    "SamplerConfig",
    "Velocity",
    "WindowTransition",
    "calculate_shift",
    "compress_schedule",
    "dpmpp_2m_step",
    "euler_step",
    "exponential_time_shift",
    "flux_sigmas",
    "group_noise",
    "key_seed",
    "keyed_normal",
    "mixed_rollout",
    "ode_solve",
    "random_window_at",
    "sde_noise",
    "sde_step_with_logprob",
    "static_time_shift",
    "window_at",
    "window_start",
]
