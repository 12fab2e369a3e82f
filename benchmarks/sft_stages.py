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
from rl_align.sft import StageObjective, make_optimizer, stage_policy, train_step
from rl_align.sft_builders import SYNTHETIC_CATEGORIES, build_synthetic_manifest
from rl_align.sft_config import STAGES, OptimConfig, SFTConfig
from rl_align.sft_data import BatchStream, SFTDataConfig
from rl_align.sft_manifest import load_manifest


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
    quarter = args.head_dim // 4
    shape = TinyFluxConfig(
        num_layers=args.double_blocks, num_single_layers=args.single_blocks, num_attention_heads=args.heads,
        attention_head_dim=args.head_dim, axes_dims_rope=(quarter, (args.head_dim - quarter) // 2, (args.head_dim - quarter) // 2),
    )
    data = SFTDataConfig(target_size=args.image_size, reference_size=args.reference_size, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        manifest = build_synthetic_manifest(Path(folder), 64, 1, args.max_subjects, args.image_size, args.reference_size, seed=0)
        samples = load_manifest(manifest, SYNTHETIC_CATEGORIES)
        stream = BatchStream(samples, manifest.parent, data, seed=0)
        batches = [stream.next() for _ in range(args.steps)]
        runs = {}
        for stage in STAGES:
            base = SFTConfig(stage=stage, data=data, optim=OptimConfig(learning_rate=1e-4))
            cfg = dataclasses.replace(base, policy=stage_policy(dataclasses.replace(base.policy, tiny=shape), stage))
            policy = FluxPolicy.from_config(cfg.policy).to(device)
            objective = StageObjective(policy, cfg)
            optimizer = make_optimizer(policy, cfg.optim)
            train_step(objective, optimizer, batches[0], 0, 1e-4)  # warm-up
            runs[stage] = (objective, optimizer)
        seconds = {stage: [] for stage in STAGES}
        for round_index in range(args.rounds):
            order = STAGES[round_index % len(STAGES) :] + STAGES[: round_index % len(STAGES)]  # no stage always first
            for stage in order:
                objective, optimizer = runs[stage]
                started = time.perf_counter()
                for key, batch in enumerate(batches):
                    train_step(objective, optimizer, batch, key, 1e-4)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[stage].append((time.perf_counter() - started) / len(batches))
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
