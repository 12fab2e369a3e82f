"""IPPO with GSPO (MultiCrafter Sec. 4.4, Algorithm 1) on Ray; the recipe is rl_align/ippo/trainer.py.

    python scripts/train_gspo.py                                   # the embedded quickstart (configs/quickstart.yaml), local Ray
    python scripts/train_gspo.py key=value ...                     # the quickstart with overrides
    python scripts/train_gspo.py --config configs/ippo_multi_human.yaml key=value ...
    ray job submit -- python scripts/train_gspo.py --config configs/ippo_multi_human.yaml
    python scripts/train_gspo.py --resume runs/<name>              # continue from the last checkpoint

Each iteration: sample a task (prompt + reference set) per group, roll out every group with the window
of this iteration (scoring each chunk as soon as it is done), compute group advantages, update the
policy on the window steps, and hand the new adapter weights to the rollout workers.

Exit status: 0 when the run is done; 2 when it cannot start (a bad config, input file, model folder or run
folder: one line says which); 3 when it stopped with a checkpoint (a reward server unreachable beyond
workers.reward_retry, a hung learner): the line says how to resume.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rl_align.core.config import ConfigError
from rl_align.core.errors import RunStopped, SetupError
from rl_align.core.runs import load_run_config, run_parser
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.ippo.trainer import train

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def resolve_config(argv: list[str] | None = None) -> tuple[GSPOTrainConfig, Path | None]:
    """The run's config (the quickstart when no --config is given) and the run folder to resume, if any."""
    args = run_parser(__doc__, GSPOTrainConfig, "sampler.eta=0.9").parse_args(argv)
    return load_run_config(GSPOTrainConfig, args, default_config=QUICKSTART), Path(args.resume) if args.resume else None


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume = resolve_config(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg, resume)
    except SetupError as exc:
        print(f"train_gspo: cannot run: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"train_gspo: stopped: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
