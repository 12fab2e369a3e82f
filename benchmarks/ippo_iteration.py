"""IPPO iteration cost on the tiny policy, measured side by side in one run.

1. IPPO (T=16, SDE window w=2, train on the window) versus a full-trajectory GRPO baseline in the
   DanceGRPO style (SDE on every step, train on 60% of the steps): ratio of iteration times (MixGRPO
   reports about 0.5).
2. The measured IPPO iteration versus the ideal built from measured pieces (T forwards + w forward-
   backward passes per chunk, plus the reward): overhead ratio (target <= 1.15).
3. Rollout throughput on a local Ray cluster with 2 rollout workers versus 1 (one thread each).

    python benchmarks/ippo_iteration.py [--iterations 3] [--skip-ray]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from policies import FluxPolicy, PolicyConfig
from rewards import RewardConfig, ScoreBatch, build_reward
from rewards.config import WeightsConfig
from rl_align.actors import Learner, RolloutWorker
from rl_align.advantages import group_advantages
from rl_align.ippo import RolloutConfig, rollout_chunk, task_conditioning
from rl_align.learner import GroupTransitions, LearnerConfig, make_optimizer, policy_update
from rl_align.tasks import SyntheticShapeTasks, TaskConfig
from samplers import GroupKey, SamplerConfig, sde_step_with_logprob
from samplers.noise import key_seed

ROLLOUT = RolloutConfig(image_size=64, reference_size=32, group_size=8, groups_per_iteration=2, chunk_size=8)
TASKS = SyntheticShapeTasks(TaskConfig(), seed=0)
REWARD = build_reward(RewardConfig(weights=WeightsConfig(colour_target=1.0)))


def iteration(policy, optimizer, sampler: SamplerConfig, window: list[int], train_fraction: float, it: int) -> dict[str, float]:
    """One iteration in-process; returns the seconds spent in rollout, reward and update."""
    times = {}
    start = time.perf_counter()
    tasks = [TASKS.task(it, g) for g in range(ROLLOUT.groups_per_iteration)]
    chunks = [rollout_chunk(policy, task, GroupKey(0, it, g), tuple(range(ROLLOUT.group_size)), window, sampler, ROLLOUT) for g, task in enumerate(tasks)]
    times["rollout"] = time.perf_counter() - start
    start = time.perf_counter()
    rewards = torch.cat([
        torch.tensor(REWARD.score(ScoreBatch(list(c.images), [t.prompt] * len(c.images), [t.references] * len(c.images))).rewards, dtype=torch.float32)
        for c, t in zip(chunks, tasks)
    ])
    times["reward"] = time.perf_counter() - start
    start = time.perf_counter()
    groups = torch.arange(len(chunks)).repeat_interleave(ROLLOUT.group_size)
    advantages = group_advantages(rewards, groups)
    generator = torch.Generator().manual_seed(key_seed("train-steps", it))
    items = []
    for g, chunk in enumerate(chunks):
        keep = max(1, round(train_fraction * len(chunk.transitions)))
        chosen = sorted(torch.randperm(len(chunk.transitions), generator=generator)[:keep].tolist())
        items.append(GroupTransitions(g, tuple(chunk.transitions[i] for i in chosen), advantages[groups == g]))
    conditionings = [task_conditioning(policy, t, ROLLOUT) for t in tasks]
    policy_update(items, lambda g: policy.velocity_fn(conditionings[g]), optimizer, LearnerConfig(learning_rate=1e-3), sampler.eta)
    times["update"] = time.perf_counter() - start
    return times


def pieces(policy, sampler: SamplerConfig) -> dict[str, float]:
    """Seconds of one forward and of one forward-backward (with the log-prob) on a chunk."""
    task = TASKS.task(0, 0)
    conditioning = task_conditioning(policy, task, ROLLOUT)
    velocity = policy.velocity_fn(conditioning)
    x = torch.randn(ROLLOUT.chunk_size, *policy.latent_shape(ROLLOUT.image_size, ROLLOUT.image_size))
    sigma = torch.full((ROLLOUT.chunk_size,), 0.8)
    with torch.no_grad():
        velocity(x, sigma)  # warm-up
        start = time.perf_counter()
        velocity(x, sigma)
        forward = time.perf_counter() - start
    start = time.perf_counter()
    step = sde_step_with_logprob(x, velocity(x, sigma), 0.8, 0.7, sampler.eta, prev_sample=x)
    step.log_prob.sum().backward()
    forward_backward = time.perf_counter() - start
    policy.zero_grad(set_to_none=True)
    return {"forward": forward, "forward_backward": forward_backward}


def ray_throughput(workers: int, rounds: int) -> float:
    """Images per second of rolling out 4 chunks of 8 samples across ``workers`` rollout workers."""
    sampler = SamplerConfig()
    actors = [RolloutWorker.options(num_cpus=1).remote(PolicyConfig(), sampler, ROLLOUT, 1, 0.0) for _ in range(workers)]
    learner = Learner.options(num_cpus=0).remote(PolicyConfig(), LearnerConfig(), sampler, ROLLOUT, 1, 0.0)
    adapters = ray.put(ray.get(learner.adapter_state.remote()))
    ray.get([a.rollout.remote(0, [adapters], TASKS.task(0, 0), GroupKey(0, 0, 0), (0,), [0, 1]) for a in actors])  # warm-up
    rates = []
    for r in range(rounds):
        start = time.perf_counter()
        refs = [actors[i % workers].rollout.remote(0, [adapters], TASKS.task(r, i), GroupKey(0, r, i), tuple(range(8)), [0, 1]) for i in range(4)]
        ray.get(refs)
        rates.append(32 / (time.perf_counter() - start))
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
    policy = FluxPolicy.from_config(PolicyConfig()).eval()
    optimizer = make_optimizer(policy.trainable_parameters(), LearnerConfig())
    ippo, full = SamplerConfig(window_size=2), SamplerConfig(window_size=16)
    iteration(policy, optimizer, ippo, [0, 1], 1.0, 0)  # warm-up
    totals = {"ippo": [], "grpo": []}
    parts = []
    for it in range(args.iterations):  # interleaved, so both see the same machine load
        times = iteration(policy, optimizer, ippo, ippo.window(it, 0), 1.0, it)
        totals["ippo"].append(sum(times.values()))
        parts.append((times, pieces(policy, ippo)))
        totals["grpo"].append(sum(iteration(policy, optimizer, full, list(range(16)), 0.6, it).values()))
    ippo_s, grpo_s = statistics.median(totals["ippo"]), statistics.median(totals["grpo"])
    chunks = ROLLOUT.groups_per_iteration * len(ROLLOUT.chunks())
    ideal = statistics.median(
        chunks * (ippo.num_steps * p["forward"] + ippo.window_size * p["forward_backward"]) + t["reward"] for t, p in parts
    )
    print(f"tiny policy, {ROLLOUT.groups_per_iteration} groups x {ROLLOUT.group_size} images at {ROLLOUT.image_size}px, T=16; median of {args.iterations} interleaved iterations")
    print(f"  IPPO (w=2, train on the window):          {ippo_s:7.2f} s/iteration")
    print(f"  GRPO (SDE on all 16 steps, train on 60%): {grpo_s:7.2f} s/iteration")
    print(f"ratio IPPO / full-trajectory GRPO:   {ippo_s / grpo_s:.2f}  (MixGRPO reports about 0.5)")
    print(f"ratio IPPO measured / ideal pieces:  {ippo_s / ideal:.2f}  (target <= 1.15; ideal = T forwards + w forward-backwards per chunk + reward)")
    if not args.skip_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        one, two = ray_throughput(1, args.iterations), ray_throughput(2, args.iterations)
        ray.shutdown()
        print(f"rollout throughput: 1 worker {one:.1f} images/s, 2 workers {two:.1f} images/s, ratio {two / one:.2f} (one thread each)")


if __name__ == "__main__":
    main()
