"""Run folders: every run writes its resolved config, logs (and later metrics, plots, samples and
checkpoints) under one folder, which one process at a time may write (``RunLock``). A resume may change
only the keys its trainer names resumable; it records what it changed once its checkpoint has loaded."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from rl_align.core.config import load_config, save_config, to_dict
from rl_align.core.errors import RunFolderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    output_root: str = "runs"  # run folders are created under this directory
    name: str = ""  # folder name; empty means "<prefix>-<YYYYmmdd-HHMMSS>" (then -2, -3 ... if taken)
    seed: int = 0  # base seed of all noise, prompts and initialisation


class RunResult(NamedTuple):
    """What a trainer's ``train(cfg)`` returns when it finished."""

    run_dir: Path
    completed: int  # iterations (IPPO) or steps (SFT) done in the run, resumed ones included
    adapters: Path  # the final adapters folder (FluxPolicy.load_adapters)
    summary: dict[str, float]  # the headline figures the trainer logged at the end


class ConfigChange(NamedTuple):
    """One leaf where two configs differ."""

    key: str  # dotted, e.g. "policy.lora.rank"
    old: Any  # plain values (lists for tuples, dicts for sections)
    new: Any


def create_run_dir(run: RunConfig, cfg: Any, prefix: str) -> Path:
    """Create a new run folder and write ``config.yaml`` (the fully resolved ``cfg``) into it.
    Refuses to reuse the folder ``run.name`` names so that no earlier run is overwritten; a default
    name already taken (a run started in the same second) gets the first free suffix -2, -3 ..."""
    name = run.name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in itertools.count(1):
        run_dir = Path(run.output_root) / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            break
        except FileExistsError:
            if run.name:
                raise RunFolderError(f"run folder {run_dir} already exists; choose another run.name or resume it (--resume {run_dir})") from None
        except OSError as exc:
            raise RunFolderError.from_os_error("create run folder", run_dir, exc) from None
    _save_config_atomically(cfg, run_dir / "config.yaml")
    return run_dir


class RunLock:
    """The one-writer lock of a run folder: an exclusive ``flock`` on ``run_dir/.lock``, which names the
    holder (PID, host, start time). The kernel releases it when the process ends however it ends, so a
    killed run never blocks its resume. Raises RunFolderError naming the holder when another process has it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError.from_os_error("lock run folder", run_dir, exc) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if isinstance(exc, BlockingIOError):
                holder = self.path.read_text().strip() or "another process"
                raise RunFolderError(f"run folder {run_dir} is being written by {holder}; wait for it to end or stop it") from None
            raise RunFolderError.from_os_error("lock run folder", run_dir, exc) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"PID {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def config_changes(before: Any, after: Any, prefix: str = "") -> list[ConfigChange]:
    """Every leaf where two configs of one class differ, by dotted key, in field order."""
    changes = []
    for f in dataclasses.fields(before):
        if not f.init:
            continue
        old, new, key = getattr(before, f.name), getattr(after, f.name), prefix + f.name
        if dataclasses.is_dataclass(old) and type(old) is type(new):
            changes += config_changes(old, new, key + ".")
        elif old != new:
            changes.append(ConfigChange(key, to_dict(old), to_dict(new)))
    return changes


def resume_changes(run_dir: Path, cfg: Any, resumable: Sequence[str]) -> list[ConfigChange]:
    """How ``cfg`` differs from the saved config.yaml of the run it resumes; reads nothing else and writes
    nothing. Only keys equal to or under an entry of ``resumable`` may change: any other change would alter
    the trained state or its reproducibility, and is a RunFolderError naming those keys."""
    changes = config_changes(load_config(type(cfg), Path(run_dir) / "config.yaml"), cfg)
    refused = [c for c in changes if not any(c.key == k or c.key.startswith(k + ".") for k in resumable)]
    if refused:
        shown = ", ".join(f"{c.key} ({c.old!r} -> {c.new!r})" for c in refused)
        raise RunFolderError(
            f"cannot resume {run_dir} with {shown}: that changes what was trained; a resume may change only "
            f"{', '.join(resumable)} (start a new run, with init_adapters, for the rest)"
        )
    return changes


def record_resume(run_dir: Path, cfg: Any, completed: int) -> list[ConfigChange]:
    """Once a resume has loaded its checkpoint: write ``cfg`` to config.yaml when it differs from the saved
    one (atomically), append ``{"time", "resumed_after", "changes": {key: [old, new]}}`` to
    ``resume_log.jsonl`` and log the changes. Returns them."""
    run_dir = Path(run_dir)
    changes = config_changes(load_config(type(cfg), run_dir / "config.yaml"), cfg)
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_after": completed, "changes": {c.key: [c.old, c.new] for c in changes}}
    if changes:
        _save_config_atomically(cfg, run_dir / "config.yaml")
        log.info("config.yaml updated by the resume: %s", ", ".join(f"{c.key} {c.old!r} -> {c.new!r}" for c in changes))
    try:
        with (run_dir / "resume_log.jsonl").open("a") as file:
            file.write(json.dumps(entry) + "\n")
    except OSError as exc:
        raise RunFolderError.from_os_error("write", run_dir / "resume_log.jsonl", exc) from None
    return changes


def _save_config_atomically(cfg: Any, path: Path) -> None:
    """save_config through a temporary file renamed into place: a failed write leaves ``path`` as it was."""
    partial = path.with_name(path.name + ".partial")
    try:
        save_config(cfg, partial)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise RunFolderError.from_os_error("write", path, exc) from None


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
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last intact checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"overrides, nested keys with dots ({example_overrides})")
    return parser


def load_run_config(config_class: type, args: argparse.Namespace, default_config: Path | None = None) -> Any:
    """A new run: the defaults, then --config (``default_config`` when none is given), then the overrides.
    With --resume: the run's own config.yaml (or --config), then the overrides; the trainer compares the
    result with the saved config.yaml key by key (``resume_changes``). Raises ConfigError."""
    if args.resume:
        return load_config(config_class, args.config or Path(args.resume) / "config.yaml", args.overrides)
    return load_config(config_class, args.config or default_config, args.overrides)
