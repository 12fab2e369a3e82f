"""JSON Lines files of records (task manifests, caption files): one object per non-blank line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from rl_align.core.errors import ManifestError


def json_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """("<path>:<line>", object) for every non-blank line of ``path``; a line that is not UTF-8 text, not
    valid JSON or not a JSON object is a ManifestError naming the file and line."""
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{where}: not UTF-8 text (byte {exc.start} of the line); expected a JSON Lines file") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record
