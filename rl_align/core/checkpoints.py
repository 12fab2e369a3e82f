"""Atomic, checksummed, resumable checkpoints under ``run_dir/checkpoints/``, one record type for both trainers.

A checkpoint is one ``torch.save`` file of plain containers and tensors (a ``Checkpoint``: the completed
iterations or steps, adapter and optimizer state, the data positions of an SFT run, and the RNG states)
with its SHA-256 beside it in ``iteration-N.pt.sha256`` (``sha256sum -c`` reads it). Both are written to
``.partial`` names, fsynced and renamed into place (the checksum first), so a crash never leaves a
half-written checkpoint behind the name ``--resume`` reads. Loading a run folder takes the newest intact
checkpoint and warns naming each damaged one it skips (a checksum that does not match, a file that does
not load); a checkpoint written before checksums existed counts as intact when it loads. Loading uses
``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from rl_align.core.errors import RunFolderError

log = logging.getLogger(__name__)
_NAME = re.compile(r"^iteration-(\d{8})\.pt$")
_FIELDS = ("completed", "adapters", "optimizer", "data_positions", "rng")


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


def checksum_path(checkpoint: Path) -> Path:
    """The file holding ``checkpoint``'s SHA-256: ``iteration-N.pt.sha256``."""
    return checkpoint.with_name(checkpoint.name + ".sha256")


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


class _HashingFile:
    """The file object ``torch.save`` writes through: hashes every byte written and keeps the OSError of a
    failed write (torch reports that as a RuntimeError, "unexpected pos", that has lost the reason)."""

    def __init__(self, file: BinaryIO):
        self.file, self.sha256 = file, hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def _write_synced(path: Path, write: Callable[[_HashingFile], object]) -> str:
    """Create ``path`` with what ``write`` writes into it, flushed and fsynced; the SHA-256 (hex) of its bytes.
    A failed write raises its OSError."""
    with open(path, "wb") as file:
        sink = _HashingFile(file)
        try:
            write(sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None
        file.flush()
        os.fsync(file.fileno())
    return sink.sha256.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint, keep: int = 3) -> Path:
    """Write ``checkpoint`` (with this process's RNG states) as ``iteration-<completed>.pt`` and its checksum,
    then delete all but the newest ``keep`` checkpoints. A failed write (a full disk, no permission) leaves
    no ``.partial`` file and raises RunFolderError naming the checkpoint."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    folder = checkpoint_dir(run_dir)
    path = folder / f"iteration-{checkpoint.completed:08d}.pt"
    partial, checksum = path.with_name(path.name + ".partial"), checksum_path(path)
    checksum_partial = checksum.with_name(checksum.name + ".partial")
    record = {
        "completed": checkpoint.completed, "adapters": checkpoint.adapters, "optimizer": checkpoint.optimizer,
        "data_positions": list(checkpoint.data_positions), "rng": rng_state(),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        digest = _write_synced(partial, lambda file: torch.save(record, file))
        _write_synced(checksum_partial, lambda file: file.write(f"{digest}  {path.name}\n".encode()))
        os.replace(checksum_partial, checksum)
        os.replace(partial, path)
        _fsync_dir(folder)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        checksum_partial.unlink(missing_ok=True)
        raise RunFolderError.from_os_error("write checkpoint", path, exc) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        checksum_path(old).unlink(missing_ok=True)
        old.unlink()
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def remove_stale_files(run_dir: Path) -> list[Path]:
    """Delete what interrupted saves left in the checkpoint folder (``*.partial`` files, checksums whose
    checkpoint is missing), logging each; call it holding the run folder's lock. The removed paths."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob("*.partial")) + [p for p in sorted(folder.glob("*.pt.sha256")) if not p.with_suffix("").exists()]
    for path in stale:
        log.warning("removing %s, left by an interrupted checkpoint save", path)
        path.unlink()
    return stale


def _read(path: Path) -> dict[str, Any]:
    """The record in the checkpoint file ``path``; RunFolderError naming it when it is damaged: its checksum
    does not match, it does not load, or it lacks a field."""
    checksum = checksum_path(path)
    try:
        if checksum.exists():
            expected = checksum.read_text().partition(" ")[0].strip()
            with path.open("rb") as file:
                actual = hashlib.file_digest(file, "sha256").hexdigest()
            if actual != expected:
                raise RunFolderError(f"checkpoint {path} is damaged: its SHA-256 {actual[:16]}... differs from {checksum.name}")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except RunFolderError:
        raise
    except Exception as exc:  # a file cut short or overwritten: torch raises RuntimeError, UnpicklingError, EOFError...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunFolderError(f"checkpoint {path} is damaged: it does not load ({reason})") from None
    missing = [name for name in _FIELDS if not isinstance(state, dict) or name not in state]
    if missing:
        raise RunFolderError(f"checkpoint {path} is damaged: it lacks {', '.join(missing)}")
    return state


def load_checkpoint(path: Path, restore_rng: bool = True) -> Checkpoint:
    """Load a checkpoint file, or the newest intact checkpoint of a run folder (warning naming each damaged
    newer one it skips), and by default restore its RNG states. FileNotFoundError when there is none;
    RunFolderError when the file, or every checkpoint of the folder, is damaged."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(path)} (expected files named iteration-NNNNNNNN.pt)")
        damaged = []
        for candidate in reversed(found):
            try:
                state = _read(candidate)
                break
            except RunFolderError as exc:
                log.warning("%s; trying the one before", exc)
                damaged.append(candidate.name)
        else:
            raise RunFolderError(f"no intact checkpoint in {checkpoint_dir(path)}; damaged: {', '.join(damaged)} (the warnings above say how)")
        if damaged:
            log.warning("using %s, the newest intact checkpoint (%d completed)", candidate, state["completed"])
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    else:
        state = _read(path)
    if restore_rng:
        restore_rng_state(state["rng"])
    return Checkpoint(state["completed"], state["adapters"], state["optimizer"], tuple(state["data_positions"]), state["rng"])
