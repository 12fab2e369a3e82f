"""The Ray side of IPPO: rollout workers, reward workers and (data-parallel) learners as actors, and
``RayWorkers``, the driver's handle on them. With rewards/ray_serve.py, the only modules importing Ray.

Data flow: a rollout returns its images and its transitions as two objects; the driver hands the images'
reference to a reward worker and the transitions' reference to a learner, and fetches only the rewards
and update statistics (and, when it saves them, sample images and checkpoints). The learner's update
returns the new adapter state as an object that the next rollouts take by reference.

Fault handling: every rollout and reward actor is created with ``max_restarts`` and ``max_task_retries``,
so an actor whose process dies is restarted and the call in flight is retried. A rollout call carries
the adapter version and a reference to its weights (wrapped in a list, so Ray does not fetch it unless
needed): a restarted worker reloads the weights on its first call instead of rolling out with the
initial policy. Learners hold the optimizer state and the process group: no restarts, a dead learner
ends the run.
"""

from __future__ import annotations

import socket
from typing import Any, Sequence

import numpy as np
import ray
import torch

from policies import PolicyConfig
from rewards import RewardConfig, RewardResult
from rl_align.core.checkpoints import Checkpoint
from rl_align.core.distributed import join_process_group
from rl_align.core.errors import SetupError
from rl_align.ippo.config import GSPOTrainConfig, WorkerConfig
from rl_align.ippo.learner import LearnerConfig, UpdateStats
from rl_align.ippo.rollout import ChunkTransitions, RolloutConfig
from rl_align.ippo.tasks import Task
from rl_align.ippo.workers import LearnerRank, RewardRunner, RolloutRunner, payload_bytes, torch_device
from samplers import GroupKey, SamplerConfig


def actor_options(cfg: WorkerConfig, gpus: float) -> dict[str, Any]:
    return dict(num_cpus=cfg.cpus_per_worker, num_gpus=gpus, max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts)


@ray.remote
class RolloutWorker:
    """A RolloutRunner; each call returns the images and the transitions as separate objects."""

    def __init__(self, policy_cfg: PolicyConfig, sampler_cfg: SamplerConfig, rollout_cfg: RolloutConfig, threads: int, gpus: float):
        torch.set_num_threads(threads)
        self.runner = RolloutRunner(policy_cfg, sampler_cfg, rollout_cfg, torch_device(gpus))

    @ray.method(num_returns=2)
    def rollout(self, version: int, adapters: list, task: Task, key: GroupKey, sample_ids: Sequence[int],
                window: Sequence[int]) -> tuple[np.ndarray, ChunkTransitions]:
        state = ray.get(adapters[0]) if version != self.runner.version else None
        chunk = self.runner.rollout(version, state, task, key, sample_ids, window)
        return chunk.images, chunk.learner_input


@ray.remote
class RewardWorker:
    def __init__(self, reward_cfg: RewardConfig, url: str, token_env: str):
        self.runner = RewardRunner(reward_cfg, url, token_env)

    def score(self, images: np.ndarray, task: Task) -> RewardResult:
        return self.runner.score(images, task)


@ray.remote
class Learner:
    """A LearnerRank; data-parallel ranks join one process group (``rendezvous`` on rank 0, then ``join``
    on all at once) and step in lockstep."""

    def __init__(self, policy_cfg: PolicyConfig, learner_cfg: LearnerConfig, rollout_cfg: RolloutConfig, threads: int, gpus: float):
        torch.set_num_threads(threads)
        self.rank = LearnerRank(policy_cfg, learner_cfg, rollout_cfg, torch_device(gpus))

    def rendezvous(self) -> str:
        """A TCP address on this actor's node for torch.distributed (called on rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, rank: int, world_size: int, init_method: str) -> None:
        self.rank.comm = join_process_group(init_method, rank, world_size, self.rank.device)

    @ray.method(num_returns=2)
    def update(self, steps: Sequence[Sequence[tuple[Task, list, np.ndarray]]], totals: Sequence[int]) -> tuple[list[UpdateStats], dict[str, torch.Tensor] | None]:
        """The iteration's optimizer steps: ``steps[k]`` is this rank's share of minibatch k, as (task,
        [transitions reference], advantages (n,)) items; ``totals[k]`` its samples on all ranks. Returns
        the statistics of each step and, on rank 0, the new adapter state (the rollout workers' next
        weights)."""
        refs = list(dict.fromkeys(ref for items in steps for _, (ref,), _ in items))  # a chunk recurs across epochs
        fetched = dict(zip(refs, ray.get(refs)))
        stats = self.rank.update([[(task, fetched[ref], adv) for task, (ref,), adv in items] for items in steps], totals)
        return stats, (self.rank.policy.adapter_state() if self.rank.comm.rank == 0 else None)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self.rank.policy.adapter_state()

    def checkpoint(self, completed: int) -> Checkpoint:
        return self.rank.checkpoint(completed)

    def restore(self, checkpoint: Checkpoint) -> None:
        self.rank.restore(checkpoint)

    def load_adapters(self, folder: str) -> None:
        """Start from warm-start adapters saved by FluxPolicy.save_adapters (e.g. by scripts/sft.py)."""
        self.rank.policy.load_adapters(folder)

    def save_adapters(self, folder: str) -> None:
        self.rank.policy.save_adapters(folder)


class RayWorkers:
    """The actors of one IPPO run on a Ray cluster (``ray.init()`` joins the cluster under ``ray job submit``
    through RAY_ADDRESS, else starts a local one). Handles are object references."""

    def __init__(self, cfg: GSPOTrainConfig):
        self.owns_ray = not ray.is_initialized()  # a caller's cluster (a test's, a notebook's) stays up
        if self.owns_ray:
            ray.init()
        w = cfg.workers
        available = ray.cluster_resources()
        for resource, amount in w.required().items():
            if amount > available.get(resource, 0.0):
                if self.owns_ray:
                    ray.shutdown()
                raise SetupError(
                    f"the workers need {amount:g} {resource} but the Ray cluster has {available.get(resource, 0.0):g}: "
                    "lower workers.* counts or per-worker shares"
                )
        self.rollout_workers = [
            RolloutWorker.options(**actor_options(w, w.gpus_per_rollout_worker)).remote(
                cfg.policy, cfg.sampler, cfg.rollout, w.torch_threads, w.gpus_per_rollout_worker
            )
            for _ in range(w.rollout_workers)
        ]
        self.reward_workers = [
            RewardWorker.options(**actor_options(w, w.gpus_per_reward_worker)).remote(cfg.reward, w.reward_url, w.reward_token_env)
            for _ in range(w.reward_workers)
        ]
        self.learners = [
            Learner.options(num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_learner).remote(
                cfg.policy, cfg.learner, cfg.rollout, w.torch_threads, w.gpus_per_learner
            )
            for _ in range(w.learners)
        ]
        if len(self.learners) > 1:
            address = ray.get(self.learners[0].rendezvous.remote())
            ray.get([learner.join.remote(rank, len(self.learners), address) for rank, learner in enumerate(self.learners)])
        self.fetched_bytes = 0

    def adapters(self) -> Any:
        return self.learners[0].adapter_state.remote()

    def rollout(self, slot, version, adapters, task, key, sample_ids, window):
        worker = self.rollout_workers[slot % len(self.rollout_workers)]
        return worker.rollout.remote(version, [adapters], task, key, sample_ids, window)

    def score(self, slot, images, task):
        return self.reward_workers[slot % len(self.reward_workers)].score.remote(images, task)

    def wait(self, handles) -> None:
        ray.wait(list(handles), num_returns=len(handles), fetch_local=False)

    def update(self, steps_per_rank, totals):
        if len(steps_per_rank) != len(self.learners):
            raise ValueError(f"{len(steps_per_rank)} step lists for {len(self.learners)} learner ranks")
        calls = [
            learner.update.remote([[(task, [transitions], adv) for task, transitions, adv in items] for items in steps], totals)
            for learner, steps in zip(self.learners, steps_per_rank)
        ]
        return [stats for stats, _ in calls], calls[0][1]

    def fetch(self, handles) -> list[Any]:
        values = list(ray.get(list(handles)))
        self.fetched_bytes += sum(payload_bytes(v) for v in values)
        return values

    def checkpoint(self, completed: int) -> Checkpoint:
        return ray.get(self.learners[0].checkpoint.remote(completed))

    def restore(self, checkpoint: Checkpoint) -> None:
        ray.get([learner.restore.remote(checkpoint) for learner in self.learners])

    def load_adapters(self, folder: str) -> None:
        ray.get([learner.load_adapters.remote(folder) for learner in self.learners])

    def save_adapters(self, folder: str) -> None:
        ray.get(self.learners[0].save_adapters.remote(folder))

    def close(self) -> None:
        for actor in self.rollout_workers + self.reward_workers + self.learners:
            ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()
