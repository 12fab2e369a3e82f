"""The module boundaries of DESIGN.md as import contracts (pyproject.toml, run by `make test` through
lint-imports): each contract breaks on a deliberately wrong import in a copy of the packages. And the
reward server's start-up imports no torch when its scorers need none."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds the import graph of every package (a few seconds) and starts Python
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("samplers", "policies", "rewards", "rl_align")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# (file of the copy, an import that file must never have, the contract it breaks)
WRONG_IMPORTS = [
    ("samplers/steps.py", "import numpy", "samplers import torch and nothing else of ours or of the heavy stack"),
    ("policies/ids.py", "import rl_align.core.config", "policies never import rewards or rl_align"),
    ("rewards/matching.py", "import policies", "rewards never import policies or rl_align"),
    ("rl_align/sft/data.py", "import rl_align.ippo.tasks", "eval sits on the trainers, the trainers on core, ippo and sft apart"),
    ("rl_align/core/tracking.py", "import rl_align.ippo.losses", "eval sits on the trainers, the trainers on core, ippo and sft apart"),
    ("rl_align/ippo/learner.py", "import rl_align.eval", "eval sits on the trainers, the trainers on core, ippo and sft apart"),
    ("rl_align/ippo/trainer.py", "import ray", "only the actor modules import Ray"),
]


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")], cwd=tree,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})


def _copy(tree: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")


@pytest.mark.parametrize("path,statement,contract", WRONG_IMPORTS, ids=[w[0] for w in WRONG_IMPORTS])
def test_each_contract_breaks_on_a_wrong_import(tmp_path, path, statement, contract):
    _copy(tmp_path)
    target = tmp_path / path
    target.write_text(target.read_text() + f"\n{statement}  # deliberately wrong\n")
    result = _lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert f"{contract} BROKEN" in result.stdout
    assert result.stdout.count("BROKEN") == 1  # the other contracts still hold


def test_reward_server_start_up_imports_no_torch_for_weight_free_scorers():
    probe = f"""
import sys
sys.argv = ["reward_server.py"]
import importlib.util
spec = importlib.util.spec_from_file_location("reward_server", {str(ROOT / "scripts" / "reward_server.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from rewards.config import RewardConfig
from rewards.server import build_app
cfg = module.load_config(RewardConfig, {str(ROOT / "configs" / "rewards" / "quickstart.yaml")!r})
build_app(cfg, {{}})
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
