"""Start-up checks for model files: every model loads from a local path in the config, and a missing one
fails before any request is served, naming the config key, the path and what belongs there."""

from __future__ import annotations

from pathlib import Path


def require_path(path: str | Path, key: str, what: str, is_dir: bool = False) -> Path:
    """Return ``path`` if it exists (a folder when ``is_dir``), else raise FileNotFoundError naming the
    config ``key``, the path and ``what`` it should hold."""
    if not str(path):
        raise FileNotFoundError(f"{key}: no path configured; set it to {what}")
    resolved = Path(path).expanduser()
    if not (resolved.is_dir() if is_dir else resolved.is_file()):
        kind = "folder" if is_dir else "file"
        raise FileNotFoundError(f"{key}={path}: missing {kind}; it should hold {what}")
    return resolved
