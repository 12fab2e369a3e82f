"""IPPO iteration cost on the tiny policy, measured side by side in one run.

1. IPPO (T=16, SDE window w=2, train on the window) versus a full-trajectory GRPO baseline in the
   DanceGRPO style (SDE on every step, train on 60% of the steps): ratio of iteration times (MixGRPO
   reports about 0.5).
2. The measured IPPO iteration versus the ideal built from measured pieces (T forwards + w forward-
   backward passes per chunk, plus the reward): overhead ratio (target <= 1.15).
3. Rollout throughput on a local Ray cluster with 2 rollout workers versus 1 (one thread each).

Iterations are the trainer's own (``rl_align.ippo.trainer.run_iteration`` on ``LocalWorkers``), so the
numbers follow any change to the rollout, reward, advantage or update phases.

    python benchmarks/ippo_iteration.py [--iterations 3] [--skip-ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import ray
import torch

from policies import FluxPolicy, PolicyConfig
from rewards import RewardConfig
from rewards.config import WeightsConfig
from rl_align.ippo.actors import Learner, RolloutWorker
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.ippo.learner import LearnerConfig
from rl_align.ippo.rollout import ChunkTransitions, RolloutConfig, task_conditioning
from rl_align.ippo.tasks import Task, TaskSource, build_task_source
from rl_align.ippo.trainer import run_iteration
from rl_align.ippo.workers import LocalWorkers
from samplers import GroupKey, SamplerConfig, WindowTransition, sde_step_with_logprob
from samplers.noise import key_seed

GRPO_TRAIN_FRACTION = 0.6  # DanceGRPO trains on this share of the trajectory's steps
RAY_CHUNKS = 4  # rollout calls per throughput round


def benchmark_config(window_size: int) -> GSPOTrainConfig:
    """The benchmarked setup: tiny policy, 2 groups x 8 images at 64 px in chunks of 8, T=16."""
    return GSPOTrainConfig(
        sampler=SamplerConfig(window_size=window_size),
        rollout=RolloutConfig(image_size=64, reference_size=32, group_size=8, groups_per_iteration=2, chunk_size=8),
        policy=PolicyConfig(),
        reward=RewardConfig(weights=WeightsConfig(colour_target=1.0)),
        learner=LearnerConfig(learning_rate=1e-3),
    )


class SubsetStepWorkers(LocalWorkers):
    """The full-trajectory GRPO baseline. With window_size = T the sampler already puts SDE on all T
    steps; DanceGRPO then trains on a random 60% of them, which here means the rollout hands the learner
    a subset of its transitions, seeded per group so every chunk of a group keeps the same steps. The
    subset costs nothing to pick, so the rollout time is that of the full SDE trajectory."""

    def rollout(self, slot, version, adapters, task, key, sample_ids, window):
        images, chunk = super().rollout(slot, version, adapters, task, key, sample_ids, window)
        generator = torch.Generator().manual_seed(key_seed("train-steps", *key))
        keep = max(1, round(GRPO_TRAIN_FRACTION * len(chunk.transitions)))
        chosen = sorted(torch.randperm(len(chunk.transitions), generator=generator)[:keep].tolist())
        experts = tuple(chunk.experts[i] for i in chosen) if chunk.experts is not None else None
        return images, ChunkTransitions(tuple(chunk.transitions[i] for i in chosen), experts)


class IterationRunner:
    """One set of workers stepping through iterations: each call runs the next one with the adapters the
    previous one produced, so every rollout after the first reloads fresh weights as in training."""

    def __init__(self, workers: LocalWorkers, cfg: GSPOTrainConfig, tasks: TaskSource):
        self.workers, self.cfg, self.tasks = workers, cfg, tasks
        self.iteration, self.adapters = 0, workers.adapters()

    def step(self) -> dict[str, float]:
        """The next iteration's seconds in rollout, reward and update."""
        result = run_iteration(self.workers, self.cfg, self.tasks, self.iteration, self.iteration, self.adapters)
        self.iteration, self.adapters = self.iteration + 1, result.adapters
        return result.seconds


def pieces(policy: FluxPolicy, cfg: GSPOTrainConfig, task: Task) -> dict[str, float]:
    """Seconds of one forward and of one forward-backward (the learner's log-prob recompute of a stored
    window transition) on a chunk."""
    velocity = policy.velocity_fn(task_conditioning(policy, task, cfg.rollout))
    size, n, eta, reduce = cfg.rollout.image_size, cfg.rollout.chunk_size, cfg.sampler.eta, cfg.sampler.logprob_reduce
    x = torch.randn(n, *policy.latent_shape(size, size))
    sigma = torch.full((n,), 0.8)
    with torch.no_grad():
        velocity(x, sigma)  # warm-up
        start = time.perf_counter()
        v = velocity(x, sigma)
        forward = time.perf_counter() - start
        step = sde_step_with_logprob(x, v, 0.8, 0.7, eta, noise=torch.randn_like(x), reduce=reduce)
    transition = WindowTransition(0, 0.8, 0.7, x, step.x_next, step.log_prob, eta, reduce)
    start = time.perf_counter()
    transition.recompute(velocity(x, sigma)).log_prob.sum().backward()
    forward_backward = time.perf_counter() - start
    policy.zero_grad(set_to_none=True)
    return {"forward": forward, "forward_backward": forward_backward}


def ray_throughput(cfg: GSPOTrainConfig, tasks: TaskSource, workers: int, rounds: int) -> float:
    """Images per second of rolling out RAY_CHUNKS chunks across ``workers`` rollout workers, each call
    taking the learner's adapters by reference as in training."""
    actors = [RolloutWorker.options(num_cpus=1).remote(cfg.policy, cfg.sampler, cfg.rollout, 1, 0.0) for _ in range(workers)]
    learner = Learner.options(num_cpus=0).remote(cfg.policy, cfg.learner, cfg.rollout, 1, 0.0)
    adapters = learner.adapter_state.remote()
    window, seed, sample_ids = cfg.sampler.window(0, cfg.run.seed), cfg.run.seed, cfg.rollout.chunks()[0]
    ray.get([a.rollout.remote(0, [adapters], tasks.task(0, 0), GroupKey(seed, 0, 0), (0,), window)[0] for a in actors])  # warm-up
    rates = []
    for r in range(rounds):
        start = time.perf_counter()
        refs = [
            ref
            for i in range(RAY_CHUNKS)
            for ref in actors[i % workers].rollout.remote(0, [adapters], tasks.task(r, i), GroupKey(seed, r, i), sample_ids, window)
        ]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)  # as the driver waits: results stay with the workers
        rates.append(RAY_CHUNKS * len(sample_ids) / (time.perf_counter() - start))
    for actor in actors + [learner]:
        ray.kill(actor)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ippo_cfg = benchmark_config(window_size=2)
    grpo_cfg = dataclasses.replace(ippo_cfg, sampler=dataclasses.replace(ippo_cfg.sampler, window_size=ippo_cfg.sampler.num_steps))
    tasks = build_task_source(ippo_cfg.tasks, ippo_cfg.run.seed)
    ippo = IterationRunner(LocalWorkers(ippo_cfg), ippo_cfg, tasks)
    grpo = IterationRunner(SubsetStepWorkers(grpo_cfg), grpo_cfg, tasks)
    ippo.step()  # warm-up (iteration 0): first calls are slow
    grpo.step()
    totals = {"ippo": [], "grpo": []}
    parts = []
    for _ in range(args.iterations):  # interleaved, so both see the same machine load
        times = ippo.step()
        totals["ippo"].append(sum(times.values()))
        parts.append((times, pieces(ippo.workers.learner.policy, ippo_cfg, tasks.task(0, 0))))
        totals["grpo"].append(sum(grpo.step().values()))
    ippo_s, grpo_s = statistics.median(totals["ippo"]), statistics.median(totals["grpo"])
    rollout, sampler = ippo_cfg.rollout, ippo_cfg.sampler
    chunks = rollout.groups_per_iteration * len(rollout.chunks())
    ideal = statistics.median(
        chunks * (sampler.num_steps * p["forward"] + sampler.window_size * p["forward_backward"]) + t["reward"] for t, p in parts
    )
    print(f"tiny policy, {rollout.groups_per_iteration} groups x {rollout.group_size} images at {rollout.image_size}px, "
          f"T={sampler.num_steps}; median of {args.iterations} interleaved iterations")
    print(f"  IPPO (w={sampler.window_size}, train on the window):          {ippo_s:7.2f} s/iteration")
    print(f"  GRPO (SDE on all {sampler.num_steps} steps, train on {GRPO_TRAIN_FRACTION:.0%}): {grpo_s:7.2f} s/iteration")
    print(f"ratio IPPO / full-trajectory GRPO:   {ippo_s / grpo_s:.2f}  (MixGRPO reports about 0.5)")
    print(f"ratio IPPO measured / ideal pieces:  {ippo_s / ideal:.2f}  (target <= 1.15; ideal = T forwards + w forward-backwards per chunk + reward)")
    if not args.skip_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        one, two = ray_throughput(ippo_cfg, tasks, 1, args.iterations), ray_throughput(ippo_cfg, tasks, 2, args.iterations)
        ray.shutdown()
        print(f"rollout throughput: 1 worker {one:.1f} images/s, 2 workers {two:.1f} images/s, ratio {two / one:.2f} (one thread each)")


if __name__ == "__main__":
    main()
