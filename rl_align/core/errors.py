"""Errors both trainers raise for bad input; each message names the file, line or key and what was expected."""

from __future__ import annotations

from pathlib import Path

from rl_align.core.config import ConfigError


class ManifestError(ValueError):
    """A bad manifest line (RL tasks or SFT samples); the message names the file and line."""


class SetupError(RuntimeError):
    """A run cannot start (a missing model folder or file, bad data, a cluster too small, a checkpoint that
    does not fit); raised before the first step, the message says what to change."""


class RunFolderError(SetupError):
    """A run folder cannot be used: no intact checkpoint, a damaged metrics line, a resume that would change
    the trained state, another process writing it, or a write that failed (full disk, no permission).
    Raised before the first step or, for a failed write, when it happens; one line naming the path."""

    @classmethod
    def from_os_error(cls, action: str, path: Path, exc: OSError) -> "RunFolderError":
        """``cannot <action> <path>: <reason>`` for an OSError of the operating system (ENOSPC, EACCES, EROFS...)."""
        return cls(f"cannot {action} {path}: {exc.strerror or exc}")


class RunStopped(RuntimeError):
    """A running trainer stopped on purpose after saving a checkpoint (a reward server unreachable beyond
    its retry budget, a learner that stopped answering); the message says why and how to resume."""


__all__ = ["ConfigError", "ManifestError", "RunFolderError", "RunStopped", "SetupError"]
