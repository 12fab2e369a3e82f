"""GSPO against per-step GRPO on the embedded default with several optimizer steps per iteration.

Both algorithms run the quickstart (configs/quickstart.yaml) with M minibatches per iteration (rollout
chunks of 4, so 2 groups give 4 chunks and M = 4 is one half-group per step), the same seeds, in this
process, interleaved iteration by iteration so machine noise hits them alike. Per algorithm it prints the
final reward (mean of the last fifth of the iterations, mean +- std over seeds), the off-policy steps'
mean clip fraction and ratio spread (max |s - 1|), the expert flip rate (MoE-LoRA routing changes since
the rollout) and the variance of the grad norm, and writes one plot of the reward curves.

    python benchmarks/gspo_vs_grpo.py [--iterations 60 --seeds 0 1 2 --minibatches 4 --plot gspo_vs_grpo.png] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from rl_align.core.config import load_config
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.ippo.tasks import build_task_source
from rl_align.ippo.trainer import iteration_metrics, run_iteration
from rl_align.ippo.workers import LocalWorkers

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
ALGORITHMS = ("gspo", "grpo")


class Run:
    """One algorithm and seed: its workers, its adapters so far and every iteration's metrics."""

    def __init__(self, algorithm: str, seed: int, minibatches: int, overrides: list[str]):
        self.cfg = load_config(GSPOTrainConfig, QUICKSTART, [
            f"learner.algorithm={algorithm}", f"run.seed={seed}", f"learner.minibatches={minibatches}", "rollout.chunk_size=4", *overrides,
        ])
        torch.manual_seed(seed)
        self.workers = LocalWorkers(self.cfg)
        self.tasks = build_task_source(self.cfg.tasks, seed)
        self.adapters = self.workers.adapters()
        self.records: list[dict[str, float]] = []

    def step(self, iteration: int) -> None:
        result = run_iteration(self.workers, self.cfg, self.tasks, iteration, iteration, self.adapters)
        self.adapters = result.adapters
        self.records.append({k: float(v) for k, v in iteration_metrics(result).items()})

    def mean(self, key: str) -> float:
        return float(np.nanmean([r.get(key, float("nan")) for r in self.records]))


def summarize(runs: list[Run]) -> str:
    finals = []
    for run in runs:
        rewards = [r["reward/mean"] for r in run.records]
        fifth = max(1, len(rewards) // 5)
        finals.append(statistics.mean(rewards[-fifth:]))
    grad_variance = statistics.mean(float(np.var([r["grad_norm"] for r in run.records])) for run in runs)
    spread = statistics.mean(run.mean("offpolicy/ratio_max_deviation") for run in runs)
    clip = statistics.mean(run.mean("offpolicy/clip_fraction") for run in runs)
    flips = statistics.mean(run.mean("offpolicy/expert_flip_rate") for run in runs)
    final_std = statistics.stdev(finals) if len(finals) > 1 else 0.0
    first = statistics.mean(run.records[0]["reward/mean"] for run in runs)
    return (f"reward {first:+.4f} -> {statistics.mean(finals):+.4f} +- {final_std:.4f}   off-policy clip {clip:.3f}   "
            f"max|s-1| {spread:.2e}   expert flips {flips:.4f}   grad-norm var {grad_variance:.2e}")


def plot(runs: dict[str, list[Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (algorithm, seeds), colour in zip(runs.items(), ("tab:blue", "tab:orange")):
        for i, run in enumerate(seeds):
            ax.plot([r["reward/mean"] for r in run.records], color=colour, alpha=0.8, lw=1, label=algorithm if i == 0 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("GSPO vs per-step GRPO on the quickstart (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--plot", default="gspo_vs_grpo.png")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the quickstart")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {a: [Run(a, seed, args.minibatches, args.overrides) for seed in args.seeds] for a in ALGORITHMS}
    for iteration in range(args.iterations):
        for seed_index in range(len(args.seeds)):
            for algorithm in ALGORITHMS:  # interleaved: both algorithms see the same machine load
                runs[algorithm][seed_index].step(iteration)
    cfg = runs["gspo"][0].cfg
    print(f"quickstart, {args.iterations} iterations, M={args.minibatches} steps per iteration, lr {cfg.learner.learning_rate:g}, "
          f"clip {cfg.learner.clip_low:g}/{cfg.learner.clip_high:g}, seeds {args.seeds}")
    for algorithm in ALGORITHMS:
        print(f"  {algorithm}: {summarize(runs[algorithm])}")
    plot(runs, Path(args.plot))
    print(f"reward curves: {args.plot}")


if __name__ == "__main__":
    main()
