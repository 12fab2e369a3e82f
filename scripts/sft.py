"""Supervised warm-start stages whose adapters seed scripts/train_gspo.py.

    python scripts/sft.py --config configs/sft/quickstart.yaml stage=idar          # train (rl_align/sft/trainer.py)
    python scripts/sft.py --resume runs/<name>                                      # continue from the last checkpoint
    python scripts/sft.py validate <manifest.jsonl> [--categories a,b] [--config c.yaml]
    python scripts/sft.py make-synthetic <out_dir> [--samples 64 --min-subjects 1 --max-subjects 2 ...]
    python scripts/sft.py build-diptych <single_manifest.jsonl> <out_dir> [--pairing random|same_category --count N]
    python scripts/sft.py build-coco <instances.json> <image_dir> <out_dir> [--captions captions.json --beta 0.015 --alpha 2]

    torchrun --nproc_per_node 8 scripts/sft.py --config ...                        # data-parallel, one process per GPU

Stages: single, idar, diptych, position_id, routing. The run folder gets config.yaml (resolved, with the
stage's policy changes), policy.yaml (the policy section, for train_gspo.py), metrics.jsonl + TensorBoard,
loss_curve.png, samples/, checkpoints/ and, at the end, adapters/. Warm-start RL with
    python scripts/train_gspo.py policy=<run>/policy.yaml init_adapters=<run>/adapters
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rl_align.core.config import ConfigError, load_config
from rl_align.core.errors import ManifestError, SetupError
from rl_align.core.runs import load_run_config, run_parser
from rl_align.sft.builders import build_coco_manifest, build_diptych_manifest, build_synthetic_manifest
from rl_align.sft.config import SFTConfig
from rl_align.sft.manifest import check_manifest, load_manifest
from rl_align.sft.trainer import train


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"validate": validate, "make-synthetic": make_synthetic, "build-diptych": build_diptych, "build-coco": build_coco}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return train_command(argv)


# ---- data commands --------------------------------------------------------------------------------------


def validate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sft.py validate", description="Report every bad line of a training manifest.")
    parser.add_argument("manifest")
    parser.add_argument("--categories", help="comma-separated allowed categories (default: data.categories of --config, else any)")
    parser.add_argument("--config", help="an SFT config whose data.categories to use")
    args = parser.parse_args(argv)
    if args.categories is not None:
        categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    elif args.config:
        categories = load_config(SFTConfig, args.config).data.categories
    else:
        categories = ()
    try:
        samples, problems = check_manifest(args.manifest, categories)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"{args.manifest}:{problem.line}: {problem.reason}")
    print(f"{len(samples)} good sample(s), {len(problems)} bad line(s)", file=sys.stderr)
    return 1 if problems else 0


def make_synthetic(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sft.py make-synthetic", description="Write the offline coloured-shape dataset.")
    parser.add_argument("out_dir")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--min-subjects", type=int, default=1)
    parser.add_argument("--max-subjects", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--reference-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    path = build_synthetic_manifest(Path(a.out_dir), a.samples, a.min_subjects, a.max_subjects, a.image_size, a.reference_size, a.seed)
    print(path)
    return 0


def build_diptych(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sft.py build-diptych", description="MUSAR diptych pairs from a single-subject manifest.")
    parser.add_argument("manifest")
    parser.add_argument("out_dir")
    parser.add_argument("--pairing", choices=("random", "same_category"), default="random")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    try:
        samples = load_manifest(a.manifest)
        path = build_diptych_manifest(samples, Path(a.manifest).parent, Path(a.out_dir), a.pairing, a.count, a.seed)
    except (ManifestError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(path)
    return 0


def build_coco(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sft.py build-coco", description="MS-CustomNet multi-subject sets from COCO instances.")
    parser.add_argument("annotations")
    parser.add_argument("image_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--captions", help="COCO captions JSON (prompts); default: a list of the subjects")
    parser.add_argument("--beta", type=float, default=0.015, help="minimum instance area ratio (Eq. 1)")
    parser.add_argument("--alpha", type=int, default=2, help="minimum salient instances per image (Eq. 2)")
    parser.add_argument("--pool-size", type=int, default=30, help="reference pool entries per category")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    report = build_coco_manifest(
        Path(a.annotations), Path(a.image_dir), Path(a.out_dir), beta=a.beta, alpha=a.alpha, pool_size=a.pool_size, seed=a.seed,
        captions_file=Path(a.captions) if a.captions else None,
    )
    print(report.manifest)
    print(
        f"{report.images_kept} images kept, {report.images_dropped} with fewer than {a.alpha} salient instances; "
        f"{report.instances_kept} instances kept, {report.instances_dropped_small} at area ratio <= {a.beta}, "
        f"{report.instances_dropped_crowd} crowd; categories: {', '.join(report.categories)}",
        file=sys.stderr,
    )
    return 0


# ---- training -------------------------------------------------------------------------------------------


def train_command(argv: list[str]) -> int:
    args = run_parser(__doc__, SFTConfig, "stage=idar, optim.learning_rate=1e-4").parse_args(argv)
    try:
        cfg = load_run_config(SFTConfig, args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg, Path(args.resume) if args.resume else None)
    except SetupError as exc:
        print(f"sft: cannot run: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
