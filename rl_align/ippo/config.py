"""The config of IPPO with GSPO (MultiCrafter Sec. 4.4, Algorithm 1): ``rl_align.ippo.trainer.train`` and
``scripts/train_gspo.py``.

Defaults: the tiny random-init policy, synthetic shape tasks, weight-free rewards, CPU, with the paper's
sampler settings (T=16, w=2, tau=50) and a paper-scale learning rate. The embedded quickstart
(configs/quickstart.yaml, what ``python scripts/train_gspo.py`` runs when no --config is given) overrides
the few values a tiny CPU run needs; the paper presets in configs/ override them for FLUX.1-dev.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies import PolicyConfig
from rewards import RewardConfig
from rewards.client import RetryPolicy
from rl_align.ippo.rollout import RolloutConfig
from rl_align.ippo.learner import LearnerConfig
from rl_align.core.runs import RunConfig
from rl_align.core.tiny_base import TinyBaseConfig
from rl_align.ippo.tasks import TaskConfig
from samplers import SamplerConfig


@dataclass(frozen=True)
class WorkerConfig:
    rollout_workers: int = 1
    reward_workers: int = 1
    learners: int = 1  # > 1: data-parallel learners (torch.distributed: gloo on CPU, nccl on GPU)
    gpus_per_rollout_worker: float = 0.0
    gpus_per_reward_worker: float = 0.0
    gpus_per_learner: float = 0.0
    # Ray logical CPUs per actor: a scheduling share, not a thread count (see torch_threads). 0.5 lets the
    # three actors of the quickstart share a 2-core machine.
    cpus_per_worker: float = 0.5
    torch_threads: int = 1  # per actor; several actors share a node's cores
    max_restarts: int = 3  # restarts of a dead (or hung, see *_timeout_s) actor before the run fails
    reward_url: str = ""  # score through a running reward server (http://host:port) instead of in-process models
    reward_token_env: str = "RL_ALIGN_REWARD_TOKEN"  # environment variable holding that server's bearer token
    # Each request to that server retries within this budget, logging every failed attempt, so a restart of
    # the server within it is ridden out; beyond it the run saves a checkpoint and stops (resume it with --resume).
    reward_retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=30, backoff_s=1.0, max_backoff_s=30.0, deadline_s=300.0))
    reward_request_timeout_s: float = 120.0  # one HTTP request
    # Hang detection: a rollout or reward worker whose calls make no progress for this long is restarted and
    # its calls retried (logged); a learner that does not answer an update within update_timeout_s stops the
    # run (learners hold the optimizer state; the run resumes from its last checkpoint).
    rollout_timeout_s: float = 900.0
    reward_timeout_s: float = 900.0
    update_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if min(self.rollout_workers, self.reward_workers, self.learners) < 1:
            raise ValueError("rollout_workers, reward_workers and learners must all be >= 1")
        if min(self.gpus_per_rollout_worker, self.gpus_per_reward_worker, self.gpus_per_learner, self.cpus_per_worker) < 0:
            raise ValueError("gpus_per_* and cpus_per_worker must be >= 0")
        if min(self.rollout_timeout_s, self.reward_timeout_s, self.update_timeout_s, self.reward_request_timeout_s) <= 0:
            raise ValueError("rollout_timeout_s, reward_timeout_s, update_timeout_s and reward_request_timeout_s must be > 0")
        if self.reward_url and self.reward_timeout_s <= self.reward_retry.deadline_s + self.reward_request_timeout_s:
            raise ValueError(
                f"reward_timeout_s ({self.reward_timeout_s:g}) must exceed reward_retry.deadline_s + reward_request_timeout_s "
                f"({self.reward_retry.deadline_s + self.reward_request_timeout_s:g}), or a reward worker riding out an outage is restarted"
            )

    def required(self) -> dict[str, float]:
        """Ray resources all actors need together."""
        actors = self.rollout_workers + self.reward_workers + self.learners
        gpus = self.rollout_workers * self.gpus_per_rollout_worker + self.reward_workers * self.gpus_per_reward_worker
        return {"CPU": actors * self.cpus_per_worker, "GPU": gpus + self.learners * self.gpus_per_learner}


@dataclass(frozen=True)
class OutputConfig:
    sample_every: int = 10  # iterations between sample grids (samples/iteration-NNNNNNNN.png, the rollouts of that iteration)
    checkpoint_every: int = 10  # iterations between checkpoints (and at the end)
    keep_checkpoints: int = 3
    plot_every: int = 10  # iterations between redraws of reward_curve.png

    def __post_init__(self) -> None:
        if min(self.sample_every, self.checkpoint_every, self.keep_checkpoints, self.plot_every) < 1:
            raise ValueError("sample_every, checkpoint_every, keep_checkpoints and plot_every must be >= 1")


@dataclass(frozen=True)
class GSPOTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    iterations: int = 300  # M in Algorithm 1 (MultiCrafter: 300)
    # Warm start: a folder written by FluxPolicy.save_adapters (for example by scripts/sft.py); empty
    # starts from the freshly initialized adapters.
    init_adapters: str = ""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # The embedded default's tiny base: with base.build_if_missing, trained into policy.path first when
    # that folder does not exist (rl_align/core/tiny_base.py).
    base: TinyBaseConfig = field(default_factory=TinyBaseConfig)
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(preset="weight_free"))
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        chunks = self.rollout.groups_per_iteration * len(self.rollout.chunks())
        if chunks % self.learner.minibatches:
            raise ValueError(
                f"learner.minibatches={self.learner.minibatches} does not divide the {chunks} rollout chunks per iteration "
                f"(rollout.groups_per_iteration x group_size / chunk_size)"
            )
        per_minibatch = chunks // self.learner.minibatches
        if self.workers.learners > per_minibatch:
            raise ValueError(
                f"workers.learners={self.workers.learners} exceeds the {per_minibatch} rollout chunks of a minibatch: some ranks would idle"
            )
        if self.learner.sharding == "fsdp" and per_minibatch % self.workers.learners:
            raise ValueError(
                f"learner.sharding=fsdp needs every learner to hold as many chunks of each minibatch: the {per_minibatch} chunks of a "
                f"minibatch do not divide over workers.learners={self.workers.learners}"
            )
