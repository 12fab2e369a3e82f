"""Evaluate policies on a benchmark with MultiCrafter's Table 1 metrics; the recipe is
rl_align/eval/evaluate.py.

    python scripts/evaluate.py --config configs/eval/quickstart.yaml --compare base=configs/policy/tiny.yaml ippo=runs/<run>
    python scripts/evaluate.py --config configs/eval/multi_human.yaml --compare sft=runs/<sft> ippo=runs/<ippo> num_tasks=100

Each policy (NAME=SPEC, SPEC as in scripts/generate.py: RUN_DIR | POLICY.yaml | DIFFUSERS_DIR, optionally
@ADAPTERS_DIR or @CHECKPOINT.pt) generates generation.num_images images per task from the same seeds; the eval folder gets
metrics.json, table.md and table.csv (a row per policy, 95% bootstrap intervals over tasks), the images
and per-task grids. Trailing key=value arguments override the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from rl_align.core.config import ConfigError, load_config
from rl_align.core.errors import ManifestError, SetupError
from rl_align.eval.config import EvalConfig
from rl_align.eval.evaluate import evaluate


def resolve_config(argv: list[str] | None = None) -> EvalConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file overriding the defaults of EvalConfig")
    parser.add_argument("--compare", nargs="+", metavar="NAME=SPEC", help="the policies to evaluate (replaces the config's policies); a NAME has no dot and is no config key")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, nested keys with dots (generation.num_images=8)")
    args = parser.parse_args(argv)
    # --compare takes every NAME=SPEC after it, and key=value overrides look the same: an item whose name
    # is a config key or has a dot (generation.num_images=8) is an override.
    keys = {f.name for f in dataclasses.fields(EvalConfig)}
    compare = [item for item in args.compare or [] if not _is_override(item, keys)]
    overrides = list(args.overrides) + [item for item in args.compare or [] if _is_override(item, keys)]
    if compare:
        overrides.append("policies=[" + ",".join(compare) + "]")
    return load_config(EvalConfig, args.config, overrides)


def _is_override(item: str, keys: set[str]) -> bool:
    name = item.partition("=")[0]
    return "." in name or name in keys


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = resolve_config(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        result = evaluate(cfg)
    except (SetupError, ManifestError) as exc:
        print(f"evaluate: cannot run: {exc}", file=sys.stderr)
        return 2
    print((result.eval_dir / "table.md").read_text())
    print(f"eval folder: {result.eval_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
