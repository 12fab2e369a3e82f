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

Hangs: the driver never waits unboundedly on rollout, reward or update calls. A rollout or reward worker
whose calls make no progress for ``workers.rollout_timeout_s`` / ``reward_timeout_s`` (a frozen process, a
stuck device) is killed and restarted by Ray, which retries its calls; a learner that does not answer
within ``update_timeout_s`` raises ``WorkerTimeout`` (the run stops; it resumes from its last checkpoint).
"""

from __future__ import annotations

import logging
import os
import socket
import time
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
from rl_align.ippo.workers import LearnerRank, RewardRunner, RewardServerFailure, RolloutRunner, payload_bytes, torch_device
from samplers import GroupKey, SamplerConfig

log = logging.getLogger("train_gspo")


class WorkerTimeout(RuntimeError):
    """A learner did not answer within ``workers.update_timeout_s``, or a restarted worker did not come back."""


def actor_options(cfg: WorkerConfig, gpus: float) -> dict[str, Any]:
    return dict(num_cpus=cfg.cpus_per_worker, num_gpus=gpus, max_restarts=cfg.max_restarts, max_task_retries=cfg.max_restarts)


@ray.remote
class RolloutWorker:
    """A RolloutRunner; each call returns the images and the transitions as separate objects."""

    def __init__(self, policy_cfg: PolicyConfig, sampler_cfg: SamplerConfig, rollout_cfg: RolloutConfig, threads: int, gpus: float):
        torch.set_num_threads(threads)
        self.runner = RolloutRunner(policy_cfg, sampler_cfg, rollout_cfg, torch_device(gpus))

    def ready(self) -> int:
        """This actor's process id, once its constructor has run."""
        return os.getpid()

    @ray.method(num_returns=2)
    def rollout(self, version: int, adapters: list, task: Task, key: GroupKey, sample_ids: Sequence[int],
                window: Sequence[int]) -> tuple[np.ndarray, ChunkTransitions]:
        state = ray.get(adapters[0]) if version != self.runner.version else None
        chunk = self.runner.rollout(version, state, task, key, sample_ids, window)
        return chunk.images, chunk.learner_input


@ray.remote
class RewardWorker:
    def __init__(self, reward_cfg: RewardConfig, workers: WorkerConfig):
        self.runner = RewardRunner(reward_cfg, workers)

    def ready(self) -> int:
        return os.getpid()

    def score(self, images: np.ndarray, task: Task) -> RewardResult:
        return self.runner.score(images, task)


@ray.remote
class Learner:
    """A LearnerRank; data-parallel ranks join one process group (``rendezvous`` on rank 0, then ``join``
    on all at once) and step in lockstep."""

    def __init__(self, policy_cfg: PolicyConfig, learner_cfg: LearnerConfig, rollout_cfg: RolloutConfig, threads: int, gpus: float):
        torch.set_num_threads(threads)
        self.rank = LearnerRank(policy_cfg, learner_cfg, rollout_cfg, torch_device(gpus))

    def ready(self) -> int:
        return os.getpid()

    def rendezvous(self) -> str:
        """A TCP address on this actor's node for torch.distributed (called on rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, rank: int, world_size: int, init_method: str) -> None:
        self.rank.connect(join_process_group(init_method, rank, world_size, self.rank.device))

    @ray.method(num_returns=2)
    def update(self, steps: Sequence[Sequence[tuple[Task, list, np.ndarray]]], totals: Sequence[int]) -> tuple[list[UpdateStats], dict[str, torch.Tensor] | None]:
        """The iteration's optimizer steps: ``steps[k]`` is this rank's share of minibatch k, as (task,
        [transitions reference], advantages (n,)) items; ``totals[k]`` its samples on all ranks. Returns
        the statistics of each step and, on rank 0, the new adapter state (the rollout workers' next
        weights)."""
        refs = list(dict.fromkeys(ref for items in steps for _, (ref,), _ in items))  # a chunk recurs across epochs
        fetched = dict(zip(refs, ray.get(refs)))
        stats = self.rank.update([[(task, fetched[ref], adv) for task, (ref,), adv in items] for items in steps], totals)
        return stats, self.rank.adapter_state()

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The whole adapter state on rank 0, None on the others (LearnerRank.adapter_state)."""
        return self.rank.adapter_state()

    def checkpoint(self, completed: int) -> Checkpoint | None:
        return self.rank.checkpoint(completed)

    def restore(self, checkpoint: Checkpoint) -> None:
        self.rank.restore(checkpoint)

    def load_adapters(self, folder: str) -> None:
        """Start from warm-start adapters saved by FluxPolicy.save_adapters (e.g. by scripts/sft.py)."""
        self.rank.policy.load_adapters(folder)

    def save_adapters(self, folder: str) -> None:
        self.rank.save_adapters(folder)


def _root_cause(exc: BaseException) -> str:
    """The last line of the innermost error text Ray carries (an actor constructor's exception)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if "Error:" in line or "Exception:" in line]
    return causes[-1] if causes else (lines[-1] if lines else type(exc).__name__)


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
            RewardWorker.options(**actor_options(w, w.gpus_per_reward_worker)).remote(cfg.reward, w)
            for _ in range(w.reward_workers)
        ]
        self.learners = [
            Learner.options(num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_learner).remote(
                cfg.policy, cfg.learner, cfg.rollout, w.torch_threads, w.gpus_per_learner
            )
            for _ in range(w.learners)
        ]
        self.workers_cfg = w
        self.pids = self._started()
        if len(self.learners) > 1:
            address = ray.get(self.learners[0].rendezvous.remote())
            ray.get([learner.join.remote(rank, len(self.learners), address) for rank, learner in enumerate(self.learners)])
            log.info("%d data-parallel learners joined at %s (learner.sharding %s)", len(self.learners), address, cfg.learner.sharding)
        self.fetched_bytes = 0
        self.restarts = 0  # hung workers restarted
        self._calls: dict[Any, tuple[str, int]] = {}  # rollout and score calls in flight -> (role, index)

    def _started(self) -> dict[str, list[int]]:
        """Wait for every actor's constructor (loading models is not a call's time) and return their PIDs by
        role; a constructor that fails (a missing model file, a bad setting) is a SetupError with its message."""
        roles = {"rollout": self.rollout_workers, "reward": self.reward_workers, "learner": self.learners}
        started = time.monotonic()
        try:
            pids = {role: ray.get([actor.ready.remote() for actor in actors]) for role, actors in roles.items()}
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise SetupError(f"a worker failed to start: {_root_cause(exc)}") from None
        self.startup_s = time.monotonic() - started
        log.info("workers started in %.1f s: %s", self.startup_s, ", ".join(f"{role} pids {ids}" for role, ids in pids.items()))
        return pids

    def adapters(self) -> Any:
        # every rank is asked (sharded ranks gather together, in the order of their calls); rank 0 answers
        return [learner.adapter_state.remote() for learner in self.learners][0]

    def rollout(self, slot, version, adapters, task, key, sample_ids, window):
        index = slot % len(self.rollout_workers)
        images, transitions = self.rollout_workers[index].rollout.remote(version, [adapters], task, key, sample_ids, window)
        self._calls[images] = ("rollout", index)
        return images, transitions

    def score(self, slot, images, task):
        index = slot % len(self.reward_workers)
        scores = self.reward_workers[index].score.remote(images, task)
        self._calls[scores] = ("reward", index)
        return scores

    def wait(self, handles) -> None:
        self._await(list(handles))

    def _await(self, refs: list) -> None:
        """Wait until every call is done, watching each actor's progress: a rollout or reward worker none of
        whose pending calls finished for its timeout is killed, Ray restarts it and retries its calls; a
        learner past update_timeout_s raises WorkerTimeout. Calls not made by rollout/score are a learner's."""
        w = self.workers_cfg
        timeouts = {"rollout": w.rollout_timeout_s, "reward": w.reward_timeout_s, "learner": w.update_timeout_s}
        pending = {ref: self._calls.get(ref, ("learner", 0)) for ref in refs}
        now = time.monotonic()
        progress = {who: now for who in pending.values()}
        poll = min(5.0, min(timeouts.values()) / 4)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=poll, fetch_local=False)
            now = time.monotonic()
            for ref in ready:
                progress[pending.pop(ref)] = now
                self._calls.pop(ref, None)
            for who in set(pending.values()):
                role, index = who
                if now - progress[who] <= timeouts[role]:
                    continue
                if role == "learner":
                    raise WorkerTimeout(f"a learner did not answer within workers.update_timeout_s={timeouts[role]:g} s")
                log.warning("%s worker %d made no progress for %.0f s (workers.%s_timeout_s): restarting it; its calls are retried",
                            role, index, now - progress[who], role)
                actor = (self.rollout_workers if role == "rollout" else self.reward_workers)[index]
                ray.kill(actor, no_restart=False)
                self.restarts += 1
                try:  # its constructor (loading models, as long as at start) is not the retried calls' time
                    ray.get(actor.ready.remote(), timeout=self.startup_s + timeouts[role])
                except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
                    raise WorkerTimeout(f"{role} worker {index} did not come back after its restart: {type(exc).__name__}") from None
                progress[who] = time.monotonic()

    def update(self, steps_per_rank, totals):
        if len(steps_per_rank) != len(self.learners):
            raise ValueError(f"{len(steps_per_rank)} step lists for {len(self.learners)} learner ranks")
        calls = [
            learner.update.remote([[(task, [transitions], adv) for task, transitions, adv in items] for items in steps], totals)
            for learner, steps in zip(self.learners, steps_per_rank)
        ]
        return [stats for stats, _ in calls], calls[0][1]

    def fetch(self, handles) -> list[Any]:
        handles = list(handles)
        self._await(handles)
        try:
            values = list(ray.get(handles))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, RewardServerFailure):
                raise exc.cause from None
            raise
        self.fetched_bytes += sum(payload_bytes(v) for v in values)
        return values

    def checkpoint(self, completed: int) -> Checkpoint:
        return ray.get([learner.checkpoint.remote(completed) for learner in self.learners])[0]

    def restore(self, checkpoint: Checkpoint) -> None:
        ray.get([learner.restore.remote(checkpoint) for learner in self.learners])

    def load_adapters(self, folder: str) -> None:
        ray.get([learner.load_adapters.remote(folder) for learner in self.learners])

    def save_adapters(self, folder: str) -> None:
        ray.get([learner.save_adapters.remote(folder) for learner in self.learners])

    def close(self) -> None:
        for actor in self.rollout_workers + self.reward_workers + self.learners:
            ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()
