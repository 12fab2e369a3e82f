"""scripts/train_gspo.py end to end on a local Ray cluster: the run folder, then --resume; the library's
train(cfg) in-process gives the script's result; the driver fetches no rollout tensors."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rl_align.core.checkpoints import list_checkpoints
from rl_align.core.config import load_config
from rl_align.core.tiny_base import TinyBaseConfig, build_tiny_base
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.ippo.trainer import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_gspo_script", ROOT / "scripts" / "train_gspo.py")
SCRIPT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SCRIPT)
TINY_RUN = [
    "sampler.num_steps=6", "sampler.window_shift_interval=2", "rollout.image_size=32", "rollout.reference_size=16",
    "rollout.group_size=4", "rollout.chunk_size=2", "tasks.reference_size=16", "learner.learning_rate=1e-3",
    "workers.rollout_workers=2", "workers.learners=2", "workers.cpus_per_worker=0.25",
    "learner.sharding=fsdp", "learner.checkpoint_blocks=true",  # the paper presets' learner: sharded, block-checkpointed
    "output.sample_every=2", "output.checkpoint_every=2", "output.plot_every=1",
]


def _command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train_gspo.py"), *args]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), capture_output=True, text=True, timeout=900)


def _adapters(run: Path) -> dict[str, torch.Tensor]:
    return {**load_file(run / "adapters" / "pytorch_lora_weights.safetensors"), **load_file(run / "adapters" / "policy_adapters.safetensors")}


@pytest.fixture(scope="module")
def small_base(tmp_path_factory) -> list[str]:
    """The quickstart's overrides for a tiny base of 2 flow-matching steps (the real one takes minutes)."""
    folder = build_tiny_base(TinyBaseConfig(steps=2, batch_size=2, sample_steps=1), tmp_path_factory.mktemp("base") / "tiny-base")
    return [f"policy.path={folder}"]


def test_run_folder_and_resume(tmp_path, small_base):
    TINY = TINY_RUN + small_base
    first = _run("--config", str(ROOT / "configs" / "quickstart.yaml"), "iterations=3", f"run.output_root={tmp_path}", "run.name=r", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "r"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["workers"]["learners"] == 2 and config["iterations"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert abs(records[0]["step/0/ratio_mean"] - 1.0) < 1e-6  # on-policy before the first update
    assert all(r["step/1/ratio_max_deviation"] > 0 for r in records)  # the quickstart's second step is off-policy
    for key in ("reward/mean", "reward/std", "reward/id/mean", "reward/subject_count/mean", "reward/background/mean", "loss", "clip_fraction", "grad_norm", "window_start",
                "step/1/clip_fraction", "step/1/expert_flip_rate", "offpolicy/ratio_max_deviation", "offpolicy/clip_fraction",
                "offpolicy/expert_flip_rate", "time/rollout", "time/reward", "time/update"):
        assert key in records[0], key
    assert [r["window_start"] for r in records] == [0, 0, 1]
    assert (run / "reward_curve.png").is_file() and list((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["iteration-00000000.png", "iteration-00000002.png"]
    assert [p.name for p in list_checkpoints(run)] == ["iteration-00000002.pt", "iteration-00000003.pt"]
    assert (run / "adapters" / "adapter_config.json").is_file()

    # The driver receives rewards and statistics, not rollout tensors: an iteration without a sample grid
    # fetches a few hundred bytes; one with a grid fetches its 8 images of 32x32x3 bytes per group on top.
    images = 2 * 4 * 32 * 32 * 3
    assert 0 < records[1]["driver/fetched_bytes"] < 2048
    assert images < records[0]["driver/fetched_bytes"] < images + 2048

    # The library's train(cfg), in this process, is the script's run: same metrics, same adapters.
    cfg, resume = SCRIPT.resolve_config(["--config", str(ROOT / "configs" / "quickstart.yaml"), "iterations=3",
                                         f"run.output_root={tmp_path}", "run.name=in-process", *TINY])
    result = train(cfg, resume)
    assert result.run_dir == tmp_path / "in-process" and result.completed == 3
    in_process = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in in_process] == [r["reward/mean"] for r in records]
    assert result.summary["reward_first_fifth"] == records[0]["reward/mean"]
    script_adapters, library_adapters = _adapters(run), _adapters(result.run_dir)
    assert script_adapters.keys() == library_adapters.keys()
    for name in script_adapters:
        assert torch.equal(script_adapters[name], library_adapters[name]), name

    resumed = _run("--resume", str(run), "iterations=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after iteration 3 (window [1, 2])" in (run / "log.txt").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["window_start"] for r in records[3:]] == [1, 2]

    # The same 5 iterations in one go, with a rollout worker killed mid-run: the run goes on (Ray restarts
    # the worker and retries its call) and ends with exactly the adapters of the interrupted run.
    log_path = tmp_path / "straight.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            _command("--config", str(ROOT / "configs" / "quickstart.yaml"), "iterations=5", f"run.output_root={tmp_path}", "run.name=s", *TINY),
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        metrics = tmp_path / "s" / "metrics.jsonl"
        for _ in range(1200):  # poll (at most ~10 minutes) until the first iteration is logged
            if (metrics.exists() and metrics.read_text().strip()) or process.poll() is not None:
                break
            time.sleep(0.5)
        workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::RolloutWorker" in " ".join(p.info["cmdline"] or [])]
        assert workers, "no rollout worker process found"
        workers[0].kill()
        assert process.wait(timeout=900) == 0, log_path.read_text()[-3000:]
    straight = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in straight] == [0, 1, 2, 3, 4]
    expected, resumed_adapters = _adapters(tmp_path / "s"), _adapters(run)
    assert expected.keys() == resumed_adapters.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed_adapters[name]), name


def test_bad_config_fails_before_starting_ray(tmp_path):
    result = _run(f"run.output_root={tmp_path}", "sampler.etta=1")
    assert result.returncode == 2 and "unknown config key 'sampler.etta'" in result.stderr
    assert not list(tmp_path.iterdir())  # no run folder for a run that never started


def test_plain_script_runs_the_quickstart_like_make_train():
    """`python scripts/train_gspo.py` with no arguments resolves to exactly `make train`'s config: the
    quickstart file, not the dataclass defaults."""
    recipe = re.search(r"^train:.*\n\t\$\(PY\) (\S+)(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe and recipe.group(1) == "scripts/train_gspo.py"
    make_args = recipe.group(2).replace("$(ARGS)", "").split()
    plain, resume = SCRIPT.resolve_config([])
    assert resume is None
    assert plain == SCRIPT.resolve_config(make_args)[0] == load_config(GSPOTrainConfig, ROOT / "configs" / "quickstart.yaml")
    assert plain != GSPOTrainConfig() and plain.iterations == 100 and plain.learner.kl_beta == 0.1 and plain.learner.per_component_advantages
    with_override, _ = SCRIPT.resolve_config(["iterations=7"])
    assert with_override.iterations == 7 and with_override.learner == plain.learner  # overrides apply on top of the quickstart


def test_known_start_up_failures_print_one_line_and_exit_2(tmp_path, small_base, capsys):
    """Each known way a run cannot start is one line on stderr and exit status 2, before any traceback:
    a missing model folder, a missing warm-start folder, an existing run name, a run folder that cannot
    be created, a negative CPU share, a task category without a condition id (a worker constructor's
    error is in test_train_outage.py, where a cluster is up)."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("")
    manifest = tmp_path / "tasks.jsonl"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ref.png")
    manifest.write_text(json.dumps({"prompt": "a hat", "references": [{"image": "ref.png", "kind": "object", "category": "hat"}]}) + "\n")
    base = [f"run.output_root={tmp_path}", *TINY_RUN, *small_base]
    cases = {
        "policy.path /nonexistent/flux is not a folder": ["policy.path=/nonexistent/flux", "base.build_if_missing=false"],
        "init_adapters: adapter folder /nonexistent/adapters has no adapter_config.json": ["init_adapters=/nonexistent/adapters"],
        "run folder": ["run.name=taken"],
        "a-file": [f"run.output_root={tmp_path / 'a-file'}"],
        "cpus_per_worker must be >= 0": ["workers.cpus_per_worker=-1"],
        "tasks.jsonl:1: references[0].category 'hat' has no condition id": [
            "tasks.source=manifest", f"tasks.manifest={manifest}", "policy.position_scheme=condition_id",
        ],
    }
    for expected, overrides in cases.items():
        assert SCRIPT.main([*base, *overrides]) == 2, expected
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("config error", "train_gspo"))]
        assert len(lines) == 1 and expected in lines[0], (expected, lines)
