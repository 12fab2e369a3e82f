"""rl-align: online RL (IPPO: mixed ODE/SDE rollouts, GSPO) for multi-subject FLUX image generators."""

from rl_align.advantages import group_advantages, weighted_component_advantages
from rl_align.config import ConfigError, apply_overrides, load_config, save_config, to_dict
from rl_align.losses import PolicyLoss, gaussian_mean_kl, grpo_step_objective, gspo_loss, gspo_objective

__all__ = [
    "ConfigError",
    "PolicyLoss",
    "apply_overrides",
    "gaussian_mean_kl",
    "group_advantages",
    "grpo_step_objective",
    "gspo_loss",
    "gspo_objective",
    "load_config",
    "save_config",
    "to_dict",
    "weighted_component_advantages",
]
