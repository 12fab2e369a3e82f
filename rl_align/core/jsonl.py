"""JSON Lines files of records (task manifests, caption files): one object per non-blank line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from rl_align.core.errors import ManifestError


def json_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """("<path>:<line>", object) for every non-blank line of ``path``; a file that is not UTF-8, a line
    that is not valid JSON or not a JSON object is a ManifestError naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}); expected a JSON Lines file") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record
