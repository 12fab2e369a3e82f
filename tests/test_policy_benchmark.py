"""The capture benchmark runs end to end (at a tiny shape) and prints its side-by-side ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_capture_benchmark_prints_ratios():
    args = ["--size", "64", "--reference-size", "32", "--heads", "2", "--head-dim", "32", "--text-dim", "32",
            "--text-tokens", "16", "--double-blocks", "1", "--single-blocks", "1", "--steps", "1", "--threads", "1"]
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "policy_attention_capture.py"), *args],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    lines = completed.stdout.splitlines()
    assert "sequence text 16 + noisy 16 + references [4, 4]" in lines[0]
    for prefix in ("none", "chunked", "full", "chunked / none:", "full / none:", "full / chunked:", "capture costs"):
        assert any(line.startswith(prefix) for line in lines), (prefix, completed.stdout)
