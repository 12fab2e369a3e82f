"""Errors both trainers raise for bad input; each message names the file, line or key and what was expected."""

from __future__ import annotations

from rl_align.core.config import ConfigError


class ManifestError(ValueError):
    """A bad manifest line (RL tasks or SFT samples); the message names the file and line."""


class SetupError(RuntimeError):
    """A run cannot start (a missing model folder or file, bad data, a cluster too small, a checkpoint that
    does not fit); raised before the first step, the message says what to change."""


__all__ = ["ConfigError", "ManifestError", "SetupError"]
