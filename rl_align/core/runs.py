"""Run folders: every run writes its resolved config, logs (and later metrics, plots, samples and
checkpoints) under one folder."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from rl_align.core.config import load_config, save_config


@dataclass(frozen=True)
class RunConfig:
    output_root: str = "runs"  # run folders are created under this directory
    name: str = ""  # folder name; empty means "<prefix>-<YYYYmmdd-HHMMSS>"
    seed: int = 0  # base seed of all noise, prompts and initialisation


class RunResult(NamedTuple):
    """What a trainer's ``train(cfg)`` returns when it finished."""

    run_dir: Path
    completed: int  # iterations (IPPO) or steps (SFT) done in the run, resumed ones included
    adapters: Path  # the final adapters folder (FluxPolicy.load_adapters)
    summary: dict[str, float]  # the headline figures the trainer logged at the end


def create_run_dir(run: RunConfig, cfg: Any, prefix: str) -> Path:
    """Create a new run folder and write ``config.yaml`` (the fully resolved ``cfg``) into it.
    Refuses to reuse an existing folder so that no earlier run is overwritten."""
    name = run.name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run.output_root) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise FileExistsError(f"run folder {run_dir} already exists; choose another run.name or resume it") from None
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def setup_logging(run_dir: Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to ``run_dir/log.txt``."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)


def run_parser(description: str, config_class: type, example_overrides: str) -> argparse.ArgumentParser:
    """The command line every training entry point shares: --config, --resume RUN_DIR, key=value overrides."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file overriding the defaults of {config_class.__name__}")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"overrides, nested keys with dots ({example_overrides})")
    return parser


def load_run_config(config_class: type, args: argparse.Namespace, default_config: Path | None = None) -> Any:
    """A new run: the defaults, then --config (``default_config`` when none is given), then the overrides.
    With --resume: the run's own config.yaml (or --config), then the overrides. Raises ConfigError."""
    if args.resume:
        return load_config(config_class, args.config or Path(args.resume) / "config.yaml", args.overrides)
    return load_config(config_class, args.config or default_config, args.overrides)
