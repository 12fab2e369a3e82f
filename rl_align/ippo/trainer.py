"""IPPO with GSPO (MultiCrafter Sec. 4.4, Algorithm 1): ``train(cfg)`` runs a whole run on Ray workers.

    open the run folder -> start the workers -> restore a checkpoint or warm start
    -> for each iteration: launch_rollouts (each chunk's images go straight to a reward worker)
       -> collect_rewards -> compute_advantages -> update_learners (epochs x minibatches optimizer
       steps; transitions go straight to the learners, the new adapters straight to the next rollouts)
       -> log, samples, plots, checkpoint.

The phases take any ``Workers`` (rl_align/ippo/workers.py): ``RayWorkers`` for training, ``LocalWorkers``
in one process for benchmarks. The driver fetches only rewards and statistics, plus sample images and
checkpoints when it saves them; ``driver/fetched_bytes`` in metrics.jsonl counts it.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple, NoReturn, Sequence

import numpy as np
import torch
from tqdm import tqdm

from policies.policy import read_adapter_description
from rewards import RewardResult
from rl_align.core.checkpoints import load_checkpoint, remove_stale_files, save_checkpoint
from rl_align.core.config import save_config
from rl_align.core.errors import ManifestError, RunStopped, SetupError
from rl_align.core.runs import RunLock, RunResult, create_run_dir, record_resume, resume_changes, setup_logging
from rl_align.core.tiny_base import ensure_base
from rl_align.core.tracking import MetricsLog, due, plot_curves, read_metrics, save_image_grid
from rl_align.ippo.actors import RayWorkers, WorkerTimeout
from rl_align.ippo.advantages import group_advantages, weighted_component_advantages
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.ippo.learner import LearnerConfig, UpdateStats, minibatch_plan
from rl_align.ippo.tasks import Task, TaskSource, build_task_source
from rl_align.ippo.workers import Handle, RewardServerFailure, Workers
from samplers import GroupKey

log = logging.getLogger("train_gspo")
PLOTTED = ["reward/mean", "loss", "grad_norm", "offpolicy/ratio_max_deviation", "offpolicy/clip_fraction", "offpolicy/expert_flip_rate"]
# The keys a resume may change (rl_align.core.runs.resume_changes): the run's length, its outputs, the
# workers' placement, and the warm start (unused on resume). Every other key (run.seed, policy, base,
# sampler, rollout, reward, learner, tasks) shapes the trained state or how the run continues it.
RESUMABLE = ("iterations", "init_adapters", "run.output_root", "run.name", "output", "workers")


class LaunchedChunk(NamedTuple):
    """One rollout call in flight: handles of its images, transitions and scores."""

    group: int
    sample_ids: tuple[int, ...]
    images: Handle  # (n, H, W, 3) uint8
    transitions: Handle  # tuple[WindowTransition, ...]
    scores: Handle  # RewardResult of the n images


class IterationLaunch(NamedTuple):
    iteration: int
    window: tuple[int, ...]  # the SDE steps of this iteration
    tasks: tuple[Task, ...]  # one per group
    chunks: tuple[LaunchedChunk, ...]  # every chunk of every group, group-major


class IterationRewards(NamedTuple):
    """Samples in chunk order (group-major)."""

    rewards: torch.Tensor  # (n,) weighted sum
    components: dict[str, torch.Tensor]  # name -> (n,) unweighted
    group_ids: torch.Tensor  # (n,)


class IterationResult(NamedTuple):
    launch: IterationLaunch
    rewards: IterationRewards
    steps: list[UpdateStats]  # one per optimizer step, in order: the first is on-policy
    adapters: Handle  # the adapter state after the last step
    seconds: dict[str, float]  # rollout, reward, update


# ---- phases ---------------------------------------------------------------------------------------------


def launch_rollouts(workers: Workers, cfg: GSPOTrainConfig, tasks: TaskSource, iteration: int, version: int, adapters: Handle) -> IterationLaunch:
    """Roll out every chunk of every group with this iteration's window and send each chunk's images to a
    reward worker as soon as they exist (Ray schedules the scoring on the rollout's output)."""
    window = tuple(cfg.sampler.window(iteration, cfg.run.seed))
    group_tasks = tuple(tasks.task(iteration, g) for g in range(cfg.rollout.groups_per_iteration))
    chunks = []
    for g, task in enumerate(group_tasks):
        for sample_ids in cfg.rollout.chunks():
            slot = len(chunks)
            images, transitions = workers.rollout(slot, version, adapters, task, GroupKey(cfg.run.seed, iteration, g), sample_ids, window)
            chunks.append(LaunchedChunk(g, tuple(sample_ids), images, transitions, workers.score(slot, images, task)))
    return IterationLaunch(iteration, window, group_tasks, tuple(chunks))


def collect_rewards(workers: Workers, launch: IterationLaunch, components: Sequence[str]) -> IterationRewards:
    """Fetch every chunk's scores (the driver's only per-sample data)."""
    scores: list[RewardResult] = workers.fetch([c.scores for c in launch.chunks])
    group_ids = torch.tensor([c.group for c in launch.chunks for _ in c.sample_ids])
    rewards = torch.tensor(np.concatenate([s.rewards for s in scores]), dtype=torch.float32)
    by_name = {name: torch.tensor(np.concatenate([s.components[name] for s in scores]), dtype=torch.float32) for name in components}
    return IterationRewards(rewards, by_name, group_ids)


def compute_advantages(rewards: IterationRewards, cfg: LearnerConfig, weights: dict[str, float]) -> torch.Tensor:
    """(n,) group-normalized advantages, of the weighted reward or of each component before weighting."""
    if cfg.per_component_advantages:
        return weighted_component_advantages(rewards.components, weights, rewards.group_ids, cfg.advantage_eps, cfg.advantage_clip)
    return group_advantages(rewards.rewards, rewards.group_ids, cfg.advantage_eps, cfg.advantage_clip)


def update_learners(workers: Workers, cfg: GSPOTrainConfig, launch: IterationLaunch, advantages: torch.Tensor) -> tuple[list[UpdateStats], Handle]:
    """The iteration's optimizer steps (``minibatch_plan``); each minibatch's chunks are dealt round-robin
    to the learner ranks, each with its task and its advantages. Returns rank 0's statistics of every step
    (every rank agrees) and the new adapters' handle."""
    offsets = np.cumsum([0] + [len(c.sample_ids) for c in launch.chunks])
    plan = minibatch_plan([c.group for c in launch.chunks], cfg.learner.minibatches, cfg.learner.epochs, cfg.run.seed, launch.iteration)
    learners = cfg.workers.learners
    steps_per_rank: list[list[list]] = [[[] for _ in plan] for _ in range(learners)]
    for k, minibatch in enumerate(plan):
        for position, j in enumerate(minibatch):
            chunk = launch.chunks[j]
            item = (launch.tasks[chunk.group], chunk.transitions, advantages[offsets[j] : offsets[j + 1]].numpy())
            steps_per_rank[position % learners][k].append(item)
    totals = [int(sum(offsets[j + 1] - offsets[j] for j in minibatch)) for minibatch in plan]
    stats, adapters = workers.update(steps_per_rank, totals)
    return workers.fetch(stats)[0], adapters


def run_iteration(workers: Workers, cfg: GSPOTrainConfig, tasks: TaskSource, iteration: int, version: int, adapters: Handle) -> IterationResult:
    """Rollout, rewards, advantages and update of one iteration."""
    started = time.perf_counter()
    launch = launch_rollouts(workers, cfg, tasks, iteration, version, adapters)
    workers.wait([c.images for c in launch.chunks])
    rolled = time.perf_counter()
    weights = cfg.reward.resolved_weights()
    rewards = collect_rewards(workers, launch, list(weights))
    scored = time.perf_counter()
    advantages = compute_advantages(rewards, cfg.learner, weights)
    stats, new_adapters = update_learners(workers, cfg, launch, advantages)
    seconds = {"rollout": rolled - started, "reward": scored - rolled, "update": time.perf_counter() - scored}
    return IterationResult(launch, rewards, stats, new_adapters, seconds)


def iteration_metrics(result: IterationResult) -> dict[str, float]:
    """Rewards, the means over the iteration's steps (loss, clip fraction, KL, grad norm), the count of
    skipped steps, each step's own statistics under ``step/<k>/``, and the off-policy steps' means under
    ``offpolicy/`` (when there are any): their ratio spread, clipping and, for MoE-LoRA, expert flips."""
    rewards, steps = result.rewards, result.steps
    record = {"reward/mean": rewards.rewards.mean(), "reward/std": rewards.rewards.std()}
    for name, values in rewards.components.items():
        record[f"reward/{name}/mean"], record[f"reward/{name}/std"] = values.mean(), values.std()
    taken = [s for s in steps if not s.skipped] or steps
    for name in ("loss", "clip_fraction", "kl", "grad_norm"):
        record[name] = float(np.mean([getattr(s, name) for s in taken]))
    record["skipped_update"] = float(sum(s.skipped for s in steps))
    record["window_start"] = result.launch.window[0]
    per_step = ["ratio_mean", "ratio_max_deviation", "clip_fraction", "grad_norm"] + (["expert_flip_rate"] if math.isfinite(steps[0].expert_flip_rate) else [])
    for k, step in enumerate(steps):
        record.update({f"step/{k}/{name}": getattr(step, name) for name in per_step})
    off_policy = [s for s in steps[1:] if not s.skipped]
    if off_policy:
        for name in ("ratio_max_deviation", "clip_fraction") + (("expert_flip_rate",) if "expert_flip_rate" in per_step else ()):
            record[f"offpolicy/{name}"] = float(np.mean([getattr(s, name) for s in off_policy]))
    record.update({f"time/{name}": value for name, value in result.seconds.items()})
    return record


def save_samples(workers: Workers, result: IterationResult, path: Path, columns: int) -> None:
    """The iteration's images, a group per row, each captioned with its reward."""
    images = np.concatenate(workers.fetch([c.images for c in result.launch.chunks]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(images, path, columns=columns, captions=[f"{float(r):.3f}" for r in result.rewards.rewards])


def open_run(cfg: GSPOTrainConfig, resume: Path | None, held: ExitStack) -> Path:
    """The run folder, locked for this process until ``held`` closes (RunFolderError naming the PID that
    holds it). A new run gets config.yaml and policy.yaml (the policy as trained, for evaluation and
    generation with the run's adapters). A resume changes nothing in the folder before ``restore`` has
    loaded its checkpoint: it refuses a config that differs from the saved one outside RESUMABLE
    (RunFolderError naming the keys) and removes what interrupted checkpoint saves left."""
    if resume is not None:
        run_dir = resume
        held.enter_context(RunLock(run_dir))
        resume_changes(run_dir, cfg, RESUMABLE)
    else:
        run_dir = create_run_dir(cfg.run, cfg, prefix="gspo")
        held.enter_context(RunLock(run_dir))
        save_config(cfg.policy, run_dir / "policy.yaml")
    setup_logging(run_dir)
    log.info("run folder %s", run_dir.resolve())
    if resume is not None:
        remove_stale_files(run_dir)
    return run_dir


def restore(workers: Workers, cfg: GSPOTrainConfig, run_dir: Path, resume: bool) -> int:
    """Iterations already done: a resumed run's newest intact checkpoint, loaded into the workers before
    the resume's config changes are written (``record_resume``); else 0 after an optional warm start.
    Raises SetupError when a resumed run has no checkpoint, RunFolderError when none is intact."""
    if resume:
        try:
            checkpoint = load_checkpoint(run_dir)
        except FileNotFoundError as exc:
            raise SetupError(str(exc)) from None
        workers.restore(checkpoint)
        record_resume(run_dir, cfg, checkpoint.completed)
        log.info("resumed after iteration %d (window %s)", checkpoint.completed, cfg.sampler.window(checkpoint.completed, cfg.run.seed))
        return checkpoint.completed
    if cfg.init_adapters:
        workers.load_adapters(cfg.init_adapters)
        log.info("warm start from adapters in %s", cfg.init_adapters)
    return 0


def check_inputs(cfg: GSPOTrainConfig) -> TaskSource:
    """What can be checked before a run folder or a worker exists: the model and warm-start folders, the
    task manifest (every line), and each task category's condition id. Raises SetupError naming the key."""
    policy = cfg.policy
    if policy.source == "local" and not (cfg.base.build_if_missing or Path(policy.path).is_dir()):
        raise SetupError(f"policy.path {policy.path} is not a folder (expected a local diffusers folder, e.g. FLUX.1-dev)")
    if cfg.init_adapters:
        try:
            read_adapter_description(cfg.init_adapters)
        except (FileNotFoundError, ValueError) as exc:
            raise SetupError(f"init_adapters: {exc}") from None
    try:
        tasks = build_task_source(cfg.tasks, cfg.run.seed)
        if policy.position_scheme == "condition_id":
            tasks.check_categories(policy.condition_categories)
    except ManifestError as exc:
        raise SetupError(str(exc)) from None
    return tasks


def stop(workers: Workers, cfg: GSPOTrainConfig, run_dir: Path, completed: int, reason: str) -> NoReturn:
    """Save the state after ``completed`` iterations and stop the run, saying how to resume it."""
    save_checkpoint(run_dir, workers.checkpoint(completed), keep=cfg.output.keep_checkpoints)
    raise RunStopped(f"{reason}; the run stopped with a checkpoint after iteration {completed}: resume it with python scripts/train_gspo.py --resume {run_dir}")


# ---- the recipe -----------------------------------------------------------------------------------------


def train(cfg: GSPOTrainConfig, resume: Path | None = None) -> RunResult:
    """Run ``cfg.iterations`` IPPO iterations on a Ray cluster (continuing the run folder ``resume`` after
    its newest intact checkpoint). Raises SetupError when the cluster cannot hold the workers, and its
    RunFolderError when the run folder cannot be used or written."""
    with ExitStack() as held:  # the run folder's lock, until the run ends
        return _train(cfg, resume, held)


def _train(cfg: GSPOTrainConfig, resume: Path | None, held: ExitStack) -> RunResult:
    tasks = check_inputs(cfg)
    run_dir = open_run(cfg, resume, held)
    ensure_base(cfg.policy, cfg.base)
    workers = RayWorkers(cfg)
    try:
        start = restore(workers, cfg, run_dir, resume is not None)
        adapters = workers.adapters()
        metrics = MetricsLog(run_dir, resume_from=start if resume is not None else None)
        progress = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="IPPO", dynamic_ncols=True)
        for iteration in progress:
            fetched_before = workers.fetched_bytes
            try:
                result = run_iteration(workers, cfg, tasks, iteration, iteration, adapters)
            except RewardServerFailure as exc:  # no update was taken: the state after `iteration` iterations
                stop(workers, cfg, run_dir, iteration, str(exc))
            except WorkerTimeout as exc:  # the learners cannot be asked for a checkpoint
                raise RunStopped(f"{exc}; resume the run from its last checkpoint: python scripts/train_gspo.py --resume {run_dir}") from None
            adapters = result.adapters
            if due(iteration, cfg.output.sample_every, cfg.iterations - 1):  # the rollouts of a policy after `iteration` updates
                save_samples(workers, result, run_dir / "samples" / f"iteration-{iteration:08d}.png", cfg.rollout.group_size)
            record = iteration_metrics(result)
            record["driver/fetched_bytes"] = workers.fetched_bytes - fetched_before
            metrics.write(iteration, record)
            progress.set_postfix(reward=f"{float(result.rewards.rewards.mean()):.4f}", window=result.launch.window[0])
            done = iteration + 1
            if due(done, cfg.output.plot_every, cfg.iterations):
                plot_curves(read_metrics(metrics.path), PLOTTED, run_dir / "reward_curve.png", title=f"IPPO {run_dir.name}", smooth=5)
            if due(done, cfg.output.checkpoint_every, cfg.iterations):
                save_checkpoint(run_dir, workers.checkpoint(done), keep=cfg.output.keep_checkpoints)
        metrics.close()
        workers.save_adapters(str(run_dir / "adapters"))
    finally:
        workers.close()
    return RunResult(run_dir, cfg.iterations, run_dir / "adapters", _summarize(run_dir))


def _summarize(run_dir: Path) -> dict[str, float]:
    """Log the mean reward of the first and the last fifth of the run's iterations."""
    rewards = [r["reward/mean"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("reward/mean") is not None]
    fifth = max(1, len(rewards) // 5)
    first, last = sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth
    log.info("done: mean reward %.4f over the first %d iterations, %.4f over the last %d; adapters in %s", first, fifth, last, fifth, run_dir / "adapters")
    return {"reward_first_fifth": first, "reward_last_fifth": last}
