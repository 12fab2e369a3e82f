"""The Ray actors of IPPO: rollout workers, reward workers and (data-parallel) learners.

Fault handling: every actor is created with ``max_restarts`` and ``max_task_retries``, so an actor whose
process dies is restarted and the call in flight is retried. A rollout call carries the adapter version
and a reference to its weights (wrapped in a list, so Ray does not fetch it unless needed): a restarted
worker reloads the weights on its first call instead of rolling out with the initial policy.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Sequence

import numpy as np
import ray
import torch

from policies import FluxPolicy, PolicyConfig
from rewards import RewardConfig, RewardResult, ScoreBatch, build_reward
from rl_align.ippo import (
    ChunkRollout,
    ReferenceVelocity,
    RolloutConfig,
    adapter_state,
    load_adapter_state,
    rollout_chunk,
    task_conditioning,
)
from rl_align.learner import GroupTransitions, LearnerConfig, UpdateStats, make_optimizer, policy_update
from rl_align.tasks import Task
from rl_align.train_config import WorkerConfig
from samplers import GroupKey, SamplerConfig


def _device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def actor_options(cfg: WorkerConfig, gpus: float) -> dict[str, Any]:
    return dict(num_cpus=cfg.cpus_per_worker, num_gpus=gpus, max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts)


@ray.remote
class RolloutWorker:
    """Holds a copy of the policy and rolls out chunks of groups with the mixed ODE/SDE sampler."""

    def __init__(self, policy_cfg: PolicyConfig, sampler_cfg: SamplerConfig, rollout_cfg: RolloutConfig, threads: int, gpus: float):
        torch.set_num_threads(threads)
        self.policy = FluxPolicy.from_config(policy_cfg).to(_device(gpus)).eval()
        self.sampler_cfg, self.rollout_cfg = sampler_cfg, rollout_cfg
        self.version = None

    def rollout(self, version: int, adapters: list, task: Task, key: GroupKey, sample_ids: Sequence[int], window: Sequence[int]) -> ChunkRollout:
        if version != self.version:
            load_adapter_state(self.policy, ray.get(adapters[0]))
            self.version = version
        return rollout_chunk(self.policy, task, key, sample_ids, window, self.sampler_cfg, self.rollout_cfg)


@ray.remote
class RewardWorker:
    """Scores images in-process with the composite reward, or through a reward server's client."""

    def __init__(self, reward_cfg: RewardConfig, url: str, token_env: str):
        if url:
            from rewards.client import RewardClient

            self.model = RewardClient(url, token=os.environ.get(token_env) or None)
        else:
            self.model = build_reward(reward_cfg)

    def score(self, images: np.ndarray, task: Task) -> RewardResult:
        n = len(images)
        return self.model.score(ScoreBatch(list(images), [task.prompt] * n, [task.references] * n))


@ray.remote
class Learner:
    """One rank of the learner: a policy copy with an optimizer. All ranks start from the same weights
    (same config and seeds) and take the same steps (gradients summed over ranks)."""

    def __init__(
        self, policy_cfg: PolicyConfig, learner_cfg: LearnerConfig, sampler_cfg: SamplerConfig, rollout_cfg: RolloutConfig,
        threads: int, gpus: float,
    ):
        torch.set_num_threads(threads)
        self.device = _device(gpus)
        # eval mode throughout: dropout would make the learner's forward differ from the rollout's.
        self.policy = FluxPolicy.from_config(policy_cfg).to(self.device).eval()
        self.learner_cfg, self.sampler_cfg, self.rollout_cfg = learner_cfg, sampler_cfg, rollout_cfg
        self.optimizer = make_optimizer(self.policy.trainable_parameters(), learner_cfg)
        self.world_size = 1

    def rendezvous(self) -> str:
        """A TCP address on this actor's node for torch.distributed (called on rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, rank: int, world_size: int, init_method: str) -> None:
        """Join the process group; every rank must be called at the same time (it blocks until all join)."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        self.world_size = world_size

    def update(self, items: Sequence[tuple[Task, ChunkRollout, np.ndarray]], total_samples: int) -> UpdateStats:
        """One step over this rank's chunks: (task, rollout, advantages (n,)) each."""
        conditionings = [task_conditioning(self.policy, task, self.rollout_cfg) for task, _, _ in items]
        chunks = [GroupTransitions(i, chunk.transitions, torch.tensor(adv, dtype=torch.float32)) for i, (_, chunk, adv) in enumerate(items)]
        return policy_update(
            chunks,
            lambda i: self.policy.velocity_fn(conditionings[i]),
            self.optimizer,
            self.learner_cfg,
            self.sampler_cfg.eta,
            self.sampler_cfg.logprob_reduce,
            reference_of=(lambda i: ReferenceVelocity(self.policy, conditionings[i])) if self.learner_cfg.kl_beta > 0 else None,
            total_samples=total_samples,
            all_reduce=self._all_reduce if self.world_size > 1 else None,
        )

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        """In-place sum over ranks (nccl needs the tensor on the device)."""
        work = tensor.to(self.device)
        torch.distributed.all_reduce(work)
        tensor.copy_(work.to(tensor.device))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.policy)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds of the learner: adapter weights and optimizer state."""
        return {"adapters": adapter_state(self.policy), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        load_adapter_state(self.policy, state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])

    def load_adapters(self, folder: str) -> None:
        """Start from warm-start adapters saved by FluxPolicy.save_adapters (e.g. by scripts/sft.py)."""
        self.policy.load_adapters(folder)

    def save_adapters(self, folder: str) -> None:
        self.policy.save_adapters(folder)

