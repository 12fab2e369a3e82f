"""rl-align: online RL (IPPO: mixed ODE/SDE rollouts, GSPO) for multi-subject FLUX image generators."""

from rl_align.config import ConfigError, apply_overrides, load_config, save_config, to_dict

__all__ = ["ConfigError", "apply_overrides", "load_config", "save_config", "to_dict"]
