"""Atomic, resumable checkpoints under ``run_dir/checkpoints/``, one record type for both trainers.

A checkpoint is one ``torch.save`` file of plain containers and tensors (a ``Checkpoint``: the completed
iterations or steps, adapter and optimizer state, the data positions of an SFT run, and the RNG states),
written to a temporary name and renamed into place, so a crash never leaves a half-written checkpoint
behind the name ``--resume`` reads. Loading uses ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^iteration-(\d{8})\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    """What a trainer needs to continue exactly where it stopped."""

    completed: int  # iterations (IPPO) or optimizer steps (SFT) done
    adapters: dict[str, torch.Tensor]  # FluxPolicy.adapter_state()
    optimizer: dict[str, Any]  # the optimizer's state_dict()
    # SFT: each data-parallel rank's batch-stream states by stream name, in rank order; () for IPPO.
    data_positions: tuple[dict[str, Any], ...] = ()
    rng: dict[str, Any] | None = None  # rng_state() when written; restored by load_checkpoint


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """The Python and torch (CPU and, when present, CUDA) generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint, keep: int = 3) -> Path:
    """Write ``checkpoint`` (with this process's RNG states) as ``iteration-<completed>.pt``, then delete all
    but the newest ``keep`` checkpoints."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"iteration-{checkpoint.completed:08d}.pt"
    partial = path.with_suffix(".pt.partial")
    record = {
        "completed": checkpoint.completed, "adapters": checkpoint.adapters, "optimizer": checkpoint.optimizer,
        "data_positions": list(checkpoint.data_positions), "rng": rng_state(),
    }
    torch.save(record, partial)
    os.replace(partial, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: Path, restore_rng: bool = True) -> Checkpoint:
    """Load a checkpoint file (or the newest one of a run folder) and, by default, restore its RNG states."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(path)} (expected files named iteration-NNNNNNNN.pt)")
        path = found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if restore_rng:
        restore_rng_state(state["rng"])
    return Checkpoint(state["completed"], state["adapters"], state["optimizer"], tuple(state["data_positions"]), state["rng"])
