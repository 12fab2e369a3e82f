"""rl-align: online RL (IPPO: mixed ODE/SDE rollouts, GSPO) and supervised warm-start trainers for
multi-subject FLUX image generators.

- ``rl_align.core``: config loader, run folders, checkpoints, tracking, distributed communication, the
  shared optimizer step, synthetic data (no Ray);
- ``rl_align.ippo``: IPPO (advantages, GSPO/GRPO losses, tasks, rollout, learner, Ray actors, ``train``);
- ``rl_align.sft``: the warm-start stages (stage registry, data, manifests, builders, ``train``).

Importing the package imports nothing heavy: the reward server reads its config through
``rl_align.core.config`` without torch.
"""
