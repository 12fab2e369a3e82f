"""IPPO with GSPO (MultiCrafter Sec. 4.4, Algorithm 1) on Ray.

    python scripts/train_gspo.py                                   # the embedded quickstart, local Ray
    python scripts/train_gspo.py --config configs/quickstart.yaml key=value ...
    ray job submit -- python scripts/train_gspo.py --config configs/ippo_multi_human.yaml
    python scripts/train_gspo.py --resume runs/<name>              # continue from the last checkpoint

Each iteration: sample a task (prompt + reference set) per group, roll out every group with the window
of this iteration (scoring each chunk as soon as it is done), compute group advantages, update the
policy on the window steps, and push the new adapter weights to the rollout workers.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from rl_align.actors import Learner, RewardWorker, RolloutWorker, actor_options
from rl_align.advantages import group_advantages, weighted_component_advantages
from rl_align.checkpoints import load_checkpoint, save_checkpoint
from rl_align.config import ConfigError, save_config
from rl_align.runs import create_run_dir, load_run_config, run_parser, setup_logging
from rl_align.tasks import build_task_source
from rl_align.tracking import MetricsLog, plot_curves, read_metrics, save_image_grid
from rl_align.train_config import GSPOTrainConfig
from samplers import GroupKey

log = logging.getLogger("train_gspo")


def main(argv: list[str] | None = None) -> int:
    args = run_parser(__doc__, GSPOTrainConfig, "sampler.eta=0.9").parse_args(argv)
    try:
        cfg = load_run_config(GSPOTrainConfig, args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.resume:
        run_dir = Path(args.resume)
        save_config(cfg, run_dir / "config.yaml")
    else:
        run_dir = create_run_dir(cfg.run, cfg, prefix="gspo")
    setup_logging(run_dir)
    log.info("run folder %s", run_dir.resolve())

    ray.init()  # joins the cluster under `ray job submit` (RAY_ADDRESS), else starts a local one
    available = ray.cluster_resources()
    for resource, amount in cfg.workers.required().items():
        if amount > available.get(resource, 0.0):
            log.error("the workers need %g %s but the Ray cluster has %g: lower workers.* counts or per-worker shares", amount, resource, available.get(resource, 0.0))
            return 2
    tasks = build_task_source(cfg.tasks, cfg.run.seed)
    w, seed, num_groups = cfg.workers, cfg.run.seed, cfg.rollout.groups_per_iteration
    rollout_workers = [
        RolloutWorker.options(**actor_options(w, w.gpus_per_rollout_worker)).remote(
            cfg.policy, cfg.sampler, cfg.rollout, w.torch_threads, w.gpus_per_rollout_worker
        )
        for _ in range(w.rollout_workers)
    ]
    reward_workers = [
        RewardWorker.options(**actor_options(w, w.gpus_per_reward_worker)).remote(cfg.reward, w.reward_url, w.reward_token_env)
        for _ in range(w.reward_workers)
    ]
    # Learners hold the optimizer state and the process group: no restarts, a dead learner ends the run.
    learners = [
        Learner.options(num_cpus=w.cpus_per_worker, num_gpus=w.gpus_per_learner).remote(
            cfg.policy, cfg.learner, cfg.sampler, cfg.rollout, w.torch_threads, w.gpus_per_learner
        )
        for _ in range(w.learners)
    ]
    if len(learners) > 1:
        address = ray.get(learners[0].rendezvous.remote())
        ray.get([learner.join.remote(rank, len(learners), address) for rank, learner in enumerate(learners)])

    start = 0
    if args.resume:
        state = load_checkpoint(run_dir)
        ray.get([learner.load_state.remote(state["learner"]) for learner in learners])
        start = state["iteration"]
        log.info("resumed after iteration %d (window %s)", start, cfg.sampler.window(start, seed))
    elif cfg.init_adapters:
        ray.get([learner.load_adapters.remote(cfg.init_adapters) for learner in learners])
        log.info("warm start from adapters in %s", cfg.init_adapters)
    adapters = ray.put(ray.get(learners[0].adapter_state.remote()))
    weights = cfg.reward.resolved_weights()

    metrics = MetricsLog(run_dir, resume_from=start if args.resume else None)
    progress = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="IPPO", dynamic_ncols=True)
    for iteration in progress:
        started = time.perf_counter()
        window = cfg.sampler.window(iteration, seed)
        group_tasks = [tasks.task(iteration, g) for g in range(num_groups)]

        # 1. Roll out every chunk of every group; score each chunk as soon as it arrives.
        rollout_refs = {}
        for g, task in enumerate(group_tasks):
            for sample_ids in cfg.rollout.chunks():
                worker = rollout_workers[len(rollout_refs) % len(rollout_workers)]
                ref = worker.rollout.remote(iteration, [adapters], task, GroupKey(seed, iteration, g), sample_ids, window)
                rollout_refs[ref] = g
        chunks, score_refs = {}, {}
        waiting = list(rollout_refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            chunk = ray.get(done[0])
            chunks[done[0]] = chunk
            scorer = reward_workers[len(score_refs) % len(reward_workers)]
            score_refs[done[0]] = scorer.score.remote(chunk.images, group_tasks[chunk.group])
        rollout_done = time.perf_counter()
        scores = dict(zip(score_refs, ray.get(list(score_refs.values()))))
        reward_done = time.perf_counter()

        # 2. Group advantages over all chunks of a group (samples in chunk order).
        order = list(rollout_refs)
        group_ids = torch.tensor([rollout_refs[r] for r in order for _ in chunks[r].sample_ids])
        rewards = torch.tensor(np.concatenate([scores[r].rewards for r in order]), dtype=torch.float32)
        components = {name: torch.tensor(np.concatenate([scores[r].components[name] for r in order]), dtype=torch.float32) for name in weights}
        lc = cfg.learner
        if lc.per_component_advantages:
            advantages = weighted_component_advantages(components, weights, group_ids, lc.advantage_eps, lc.advantage_clip)
        else:
            advantages = group_advantages(rewards, group_ids, lc.advantage_eps, lc.advantage_clip)

        # 3. Update on the window steps, chunks spread over the learners; then publish the new weights.
        per_learner = defaultdict(list)
        offset = 0
        for i, ref in enumerate(order):
            n = len(chunks[ref].sample_ids)
            per_learner[i % len(learners)].append((group_tasks[chunks[ref].group], chunks[ref], advantages[offset : offset + n].numpy()))
            offset += n
        stats = ray.get([learners[rank].update.remote(items, len(rewards)) for rank, items in per_learner.items()])[0]
        adapters = ray.put(ray.get(learners[0].adapter_state.remote()))
        update_done = time.perf_counter()

        # 4. Metrics, samples, plots, checkpoints.
        record = {"reward/mean": rewards.mean(), "reward/std": rewards.std()}
        for name, values in components.items():
            record[f"reward/{name}/mean"], record[f"reward/{name}/std"] = values.mean(), values.std()
        record.update(
            {"loss": stats.loss, "ratio_mean": stats.ratio_mean, "clip_fraction": stats.clip_fraction, "kl": stats.kl,
             "grad_norm": stats.grad_norm, "skipped_update": float(stats.skipped), "window_start": window[0],
             "time/rollout": rollout_done - started, "time/reward": reward_done - rollout_done, "time/update": update_done - reward_done}
        )
        metrics.write(iteration, record)
        progress.set_postfix(reward=f"{float(rewards.mean()):.4f}", window=window[0])
        last = iteration + 1 == cfg.iterations
        if iteration % cfg.output.sample_every == 0 or last:
            images = np.concatenate([chunks[r].images for r in order])
            (run_dir / "samples").mkdir(exist_ok=True)
            save_image_grid(images, run_dir / "samples" / f"iteration-{iteration:08d}.png", columns=cfg.rollout.group_size,
                            captions=[f"{float(r):.3f}" for r in rewards])
        if (iteration + 1) % cfg.output.plot_every == 0 or last:
            plot_curves(read_metrics(metrics.path), ["reward/mean", "loss", "clip_fraction", "grad_norm"], run_dir / "reward_curve.png",
                        title=f"IPPO {run_dir.name}", smooth=5)
        if (iteration + 1) % cfg.output.checkpoint_every == 0 or last:
            save_checkpoint(run_dir, iteration + 1, {"learner": ray.get(learners[0].state.remote())}, keep=cfg.output.keep_checkpoints)
    metrics.close()
    ray.get(learners[0].save_adapters.remote(str(run_dir / "adapters")))
    _summarize(run_dir)
    return 0


def _summarize(run_dir: Path) -> None:
    """Log the mean reward of the first and the last fifth of the run's iterations."""
    rewards = [r["reward/mean"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("reward/mean") is not None]
    fifth = max(1, len(rewards) // 5)
    log.info(
        "done: mean reward %.4f over the first %d iterations, %.4f over the last %d; adapters in %s",
        sum(rewards[:fifth]) / fifth, fifth, sum(rewards[-fifth:]) / fifth, fifth, run_dir / "adapters",
    )


if __name__ == "__main__":
    sys.exit(main())
