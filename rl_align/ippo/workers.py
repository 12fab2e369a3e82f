"""The three IPPO roles as plain objects (no Ray): a rollout runner, a reward runner and a learner rank.
The Ray actors (rl_align/ippo/actors.py) each wrap one; ``LocalWorkers`` runs all of them in this
process behind the same driver interface, for benchmarks and tests without a cluster.

The driver interface (``Workers``) deals in handles: on Ray they are object references, so the driver
passes rollout images to reward workers and transitions to learners without receiving them; locally they
are the values themselves. The driver calls ``fetch`` only for what it logs or saves.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from policies import Conditioning, FluxPolicy, PolicyConfig
from rewards import RewardConfig, RewardResult, ScoreBatch, build_reward
from rewards.client import RewardClient, RewardServerError
from rl_align.core.checkpoints import Checkpoint
from rl_align.core.distributed import Communicator, gathered_optimizer_state, load_optimizer_state
from rl_align.core.optim import make_optimizer
from rl_align.ippo.config import GSPOTrainConfig, WorkerConfig
from rl_align.ippo.learner import GroupTransitions, LearnerConfig, UpdateStats, policy_update
from rl_align.ippo.rollout import ChunkRollout, ChunkTransitions, ReferenceVelocity, RolloutConfig, rollout_chunk, task_conditioning
from rl_align.ippo.tasks import Task
from samplers import GroupKey, SamplerConfig

Handle = Any  # an object reference (Ray) or the value itself (LocalWorkers)
LearnerItem = tuple[Task, ChunkTransitions, np.ndarray]  # a chunk for the learner: its task, transitions, advantages (n,)


def torch_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


class RolloutRunner:
    """A policy copy that rolls out chunks of groups with the mixed ODE/SDE sampler."""

    def __init__(self, policy_cfg: PolicyConfig, sampler_cfg: SamplerConfig, rollout_cfg: RolloutConfig, device: torch.device):
        self.policy = FluxPolicy.from_config(policy_cfg).to(device).eval()
        for name in ("image_size", "reference_size"):  # at start-up, not at the first rollout
            size = getattr(rollout_cfg, name)
            try:
                self.policy.latent_shape(size, size)
            except ValueError as exc:
                raise ValueError(f"rollout.{name}: {exc}") from None
        self.sampler_cfg, self.rollout_cfg = sampler_cfg, rollout_cfg
        self.version: int | None = None  # the adapter version loaded

    def rollout(self, version: int, adapters: dict[str, torch.Tensor] | None, task: Task, key: GroupKey,
                sample_ids: Sequence[int], window: Sequence[int]) -> ChunkRollout:
        """Roll out with adapter ``version``, loading ``adapters`` first when this copy holds another one."""
        if version != self.version:
            self.policy.load_adapter_state(adapters, source=f"adapter version {version}")
            self.version = version
        return rollout_chunk(self.policy, task, key, sample_ids, window, self.sampler_cfg, self.rollout_cfg)


class RewardServerFailure(RuntimeError):
    """The reward server refused a chunk (4xx) or stayed unreachable beyond the retry budget: the trainer
    checkpoints and stops instead of training on missing rewards."""


class RewardRunner:
    """Scores images in-process with the composite reward, or through a reward server's client (with the
    workers' retry budget and request timeout)."""

    def __init__(self, reward_cfg: RewardConfig, workers: WorkerConfig):
        if workers.reward_url:
            self.model = RewardClient(
                workers.reward_url, token=os.environ.get(workers.reward_token_env) or None,
                timeout_s=workers.reward_request_timeout_s, retry=workers.reward_retry,
            )
        else:
            self.model = build_reward(reward_cfg)

    def score(self, images: np.ndarray, task: Task) -> RewardResult:
        n = len(images)
        batch = ScoreBatch(list(images), [task.prompt] * n, [task.references] * n)
        try:
            return self.model.score(batch)
        except RewardServerError as exc:
            raise RewardServerFailure(f"reward server: {exc}") from None


class LearnerRank:
    """One rank of the learner: a policy copy with an optimizer. All ranks start from the same weights
    (same config and seeds) and take the same steps: gradients summed over ranks by ``comm``, or, with
    ``learner.sharding: fsdp``, each rank holding its shard of the transformer, its gradients and its
    optimizer states. Sharded ranks gather whole tensors together: call ``adapter_state``,
    ``checkpoint`` and ``save_adapters`` on every rank (ranks other than 0 get None / write nothing)."""

    def __init__(self, policy_cfg: PolicyConfig, learner_cfg: LearnerConfig, rollout_cfg: RolloutConfig, device: torch.device):
        self.device = device
        # eval mode throughout: dropout would make the learner's forward differ from the rollout's.
        self.policy = FluxPolicy.from_config(policy_cfg).to(device).eval()
        if learner_cfg.checkpoint_blocks:
            self.policy.enable_block_checkpointing()
        self.learner_cfg, self.rollout_cfg = learner_cfg, rollout_cfg
        self.optimizer = make_optimizer(self.policy.trainable_parameters(), learner_cfg)
        self.comm = Communicator(0, 1, device)
        self.sharded = False

    def connect(self, comm: Communicator) -> None:
        """Take this rank's place among the data-parallel learners, before any update or restore; with
        ``sharding: fsdp`` and more than one rank, shard the transformer and build the optimizer over the
        shards."""
        self.comm = comm
        if self.learner_cfg.sharding == "fsdp" and comm.world > 1:
            self.policy.shard_transformer()
            self.optimizer = make_optimizer(self.policy.trainable_parameters(), self.learner_cfg)
            self.sharded = True

    def update(self, steps: Sequence[Sequence[LearnerItem]], totals: Sequence[int]) -> list[UpdateStats]:
        """One optimizer step per minibatch: ``steps[k]`` is this rank's share of minibatch k (task, chunk
        transitions, advantages (n,)), ``totals[k]`` the minibatch's samples on all ranks."""
        conditionings: dict[int, Conditioning] = {}  # by task: each task's conditioning is built once
        for items in steps:
            for task, _, _ in items:
                if id(task) not in conditionings:
                    conditionings[id(task)] = task_conditioning(self.policy, task, self.rollout_cfg)
        return [self._step(items, total, conditionings) for items, total in zip(steps, totals, strict=True)]

    def _step(self, items: Sequence[LearnerItem], total: int, conditionings: dict[int, Conditioning]) -> UpdateStats:
        tasks = [task for task, _, _ in items]
        chunks = [
            GroupTransitions(i, chunk.transitions, torch.tensor(adv, dtype=torch.float32), chunk.experts)
            for i, (_, chunk, adv) in enumerate(items)
        ]
        return policy_update(
            chunks,
            lambda i: self.policy.velocity_fn(conditionings[id(tasks[i])]),
            self.optimizer,
            self.learner_cfg,
            reference_of=(lambda i: ReferenceVelocity(self.policy, conditionings[id(tasks[i])])) if self.learner_cfg.kl_beta > 0 else None,
            total_samples=total,
            all_reduce=self.comm.all_reduce if self.comm.world > 1 else None,
            sharded=self.sharded,
        )

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The whole adapter state on rank 0, None on the others."""
        state = self.policy.adapter_state() if self.sharded or self.comm.main else None
        return state if self.comm.main else None

    def checkpoint(self, completed: int) -> Checkpoint | None:
        """The whole checkpoint (adapters and optimizer state, gathered when sharded) on rank 0, None on the others."""
        if not (self.sharded or self.comm.main):
            return None
        checkpoint = Checkpoint(completed, self.policy.adapter_state(), gathered_optimizer_state(self.optimizer))
        return checkpoint if self.comm.main else None

    def restore(self, checkpoint: Checkpoint) -> None:
        self.policy.load_adapter_state(checkpoint.adapters, source="the checkpoint")
        load_optimizer_state(self.optimizer, checkpoint.optimizer)

    def save_adapters(self, folder: str) -> None:
        """Rank 0 writes the adapters (gathered with the other ranks when sharded)."""
        if self.sharded and not self.comm.main:
            self.policy.adapter_state()
        elif self.comm.main:
            self.policy.save_adapters(folder)


class Workers(Protocol):
    """What the IPPO driver asks of its workers (Ray actors or ``LocalWorkers``)."""

    def adapters(self) -> Handle:
        """The learner's current adapter state."""

    def rollout(self, slot: int, version: int, adapters: Handle, task: Task, key: GroupKey, sample_ids: Sequence[int],
                window: Sequence[int]) -> tuple[Handle, Handle]:
        """Roll out on rollout worker ``slot`` (modulo their count): (images (n, H, W, 3) uint8, ChunkTransitions)."""

    def score(self, slot: int, images: Handle, task: Task) -> Handle:
        """A RewardResult of the images, from reward worker ``slot`` (modulo their count)."""

    def wait(self, handles: Sequence[Handle]) -> None:
        """Block until the handles' values exist, without fetching them."""

    def update(self, steps_per_rank: Sequence[Sequence[Sequence[tuple[Task, Handle, np.ndarray]]]], totals: Sequence[int]) -> tuple[Handle, Handle]:
        """The iteration's optimizer steps on every learner rank: ``steps_per_rank[r][k]`` is rank r's share
        of minibatch k (task, transitions handle, advantages), ``totals[k]`` the minibatch's samples.
        Returns (each rank's list of UpdateStats, one per step; the new adapter state)."""

    def fetch(self, handles: Sequence[Handle]) -> list[Any]:
        """The values (counted in ``fetched_bytes``)."""

    def checkpoint(self, completed: int) -> Checkpoint: ...

    def restore(self, checkpoint: Checkpoint) -> None: ...

    def load_adapters(self, folder: str) -> None: ...

    def save_adapters(self, folder: str) -> None: ...

    def close(self) -> None: ...


def payload_bytes(value: Any) -> int:
    """Bytes of the arrays and tensors inside ``value`` (nested tuples, lists, dicts, NamedTuples and
    dataclasses), plus 8 per other leaf: the size of what a driver fetch moves."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(payload_bytes(k) + payload_bytes(v) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return sum(payload_bytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(payload_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    if isinstance(value, (str, bytes)):
        return len(value)
    return 8


class LocalWorkers:
    """One rollout runner, one reward runner and one learner rank in this process; handles are values."""

    def __init__(self, cfg: GSPOTrainConfig, device: str = "cpu"):
        device = torch.device(device)
        self.rollout_runner = RolloutRunner(cfg.policy, cfg.sampler, cfg.rollout, device)
        self.reward_runner = RewardRunner(cfg.reward, cfg.workers)
        self.learner = LearnerRank(cfg.policy, cfg.learner, cfg.rollout, device)
        self.fetched_bytes = 0

    def adapters(self) -> Handle:
        return self.learner.adapter_state()

    def rollout(self, slot, version, adapters, task, key, sample_ids, window):
        chunk = self.rollout_runner.rollout(version, adapters, task, key, sample_ids, window)
        return chunk.images, chunk.learner_input

    def score(self, slot, images, task):
        return self.reward_runner.score(images, task)

    def wait(self, handles) -> None:
        return None

    def update(self, steps_per_rank, totals):
        if len(steps_per_rank) != 1:
            raise ValueError(f"LocalWorkers has one learner rank, got steps for {len(steps_per_rank)}")
        return [self.learner.update(steps_per_rank[0], totals)], self.learner.adapter_state()

    def fetch(self, handles):
        values = list(handles)
        self.fetched_bytes += sum(payload_bytes(v) for v in values)
        return values

    def checkpoint(self, completed: int) -> Checkpoint:
        return self.learner.checkpoint(completed)

    def restore(self, checkpoint: Checkpoint) -> None:
        self.learner.restore(checkpoint)

    def load_adapters(self, folder: str) -> None:
        self.learner.policy.load_adapters(folder)

    def save_adapters(self, folder: str) -> None:
        self.learner.save_adapters(folder)

    def close(self) -> None:
        return None
