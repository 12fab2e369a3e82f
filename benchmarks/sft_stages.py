"""Cost of one training step of each SFT stage relative to the plain flow-matching stage (`single`), on the
same data and model shape, measured side by side in one process (rounds interleave the stages, so machine
noise hits them alike). Also reports how many conditioning groups the phrase stages split a batch into
(samples whose item phrases fall on different prompt tokens cannot share position ids).

    python benchmarks/sft_stages.py                                   # tiny policy, 64 px, batch 4, CPU
    python benchmarks/sft_stages.py --heads 8 --head-dim 64 --image-size 256 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from policies import FluxPolicy, TinyFluxConfig
from rl_align.core.optim import make_optimizer
from rl_align.sft.builders import SYNTHETIC_CATEGORIES, build_synthetic_manifest
from rl_align.sft.config import OptimConfig, SFTConfig
from rl_align.sft.data import BatchStream, SFTBatch, SFTDataConfig
from rl_align.sft.manifest import load_manifest
from rl_align.sft.objective import StageObjective, train_step
from rl_align.sft.stages import STAGES, stage_policy


LEARNING_RATE = 1e-4


def tiny_shape(args: argparse.Namespace) -> TinyFluxConfig:
    quarter = args.head_dim // 4
    return TinyFluxConfig(
        num_layers=args.double_blocks, num_single_layers=args.single_blocks, num_attention_heads=args.heads,
        attention_head_dim=args.head_dim, axes_dims_rope=(quarter, (args.head_dim - quarter) // 2, (args.head_dim - quarter) // 2),
    )


def draw_batches(folder: Path, data: SFTDataConfig, args: argparse.Namespace) -> list[SFTBatch]:
    """The timed batches, drawn once from a synthetic manifest so every stage steps on the same ones."""
    manifest = build_synthetic_manifest(folder, 64, 1, args.max_subjects, args.image_size, args.reference_size, seed=0)
    stream = BatchStream(load_manifest(manifest, SYNTHETIC_CATEGORIES), manifest.parent, data, seed=0)
    return [stream.next() for _ in range(args.steps)]


def stage_run(stage: str, data: SFTDataConfig, shape: TinyFluxConfig, device: torch.device) -> tuple[StageObjective, torch.optim.Optimizer]:
    """The stage's objective on the policy it trains (as ``rl_align.sft.trainer`` builds them), and its optimizer."""
    base = SFTConfig(stage=stage, data=data, optim=OptimConfig(learning_rate=LEARNING_RATE))
    cfg = dataclasses.replace(base, policy=stage_policy(dataclasses.replace(base.policy, tiny=shape), stage))
    objective = StageObjective(FluxPolicy.from_config(cfg.policy).to(device), cfg)
    return objective, make_optimizer(objective.policy.trainable_parameters(), cfg.optim)


def time_stages(runs: dict[str, tuple[StageObjective, torch.optim.Optimizer]], batches: list[SFTBatch], rounds: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each stage in each round. The step is the trainer's ``train_step``, not
    ``take_step``: take_step pulls its batch from the stage's own streams (diptych draws other data), and
    the comparison needs every stage on the same pre-drawn batches, with no data loading in the timing."""
    for objective, optimizer in runs.values():
        train_step(objective, optimizer, batches[0], 0, LEARNING_RATE)  # warm-up
    seconds = {stage: [] for stage in runs}
    for round_index in range(rounds):
        order = STAGES[round_index % len(STAGES) :] + STAGES[: round_index % len(STAGES)]  # no stage always first
        for stage in order:
            objective, optimizer = runs[stage]
            started = time.perf_counter()
            for key, batch in enumerate(batches):
                train_step(objective, optimizer, batch, key, LEARNING_RATE)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[stage].append((time.perf_counter() - started) / len(batches))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--reference-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-subjects", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--double-blocks", type=int, default=2)
    parser.add_argument("--single-blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per stage per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = SFTDataConfig(target_size=args.image_size, reference_size=args.reference_size, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        batches = draw_batches(Path(folder), data, args)
    runs = {stage: stage_run(stage, data, tiny_shape(args), device) for stage in STAGES}
    seconds = time_stages(runs, batches, args.rounds, device)
    groups = {stage: statistics.mean(len(objective.groups(b)) for b in batches) for stage, (objective, _) in runs.items()}
    single = statistics.median(seconds["single"])
    print(f"{args.image_size} px targets, batch {args.batch_size}, 1-{args.max_subjects} subjects, {args.heads}x{args.head_dim} heads, "
          f"{args.double_blocks}+{args.single_blocks} blocks, {device}; median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'stage':<12} {'ms/step':>9} {'x single':>9} {'groups/batch':>13}")
    for stage in STAGES:
        median = statistics.median(seconds[stage])
        print(f"{stage:<12} {1000 * median:>9.1f} {median / single:>9.2f} {groups[stage]:>13.2f}")


if __name__ == "__main__":
    main()
