"""scripts/sft.py end to end: the run folder, resume, refusing bad data, and a warm start of train_gspo.py
from its adapters; the library's train(cfg) in-process gives the script's result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from policies import FluxPolicy
from rl_align.core.checkpoints import list_checkpoints, load_checkpoint
from rl_align.core.config import load_config
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.sft.config import SFTConfig
from rl_align.sft.trainer import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "sft" / "quickstart.yaml")
SMALL = [
    "data.synthetic.samples=16", "data.synthetic.image_size=32", "data.target_size=32", "data.synthetic.reference_size=16",
    "data.reference_size=16", "output.eval_every=2", "output.sample_every=2", "output.checkpoint_every=2", "output.plot_every=2",
    "output.sample_steps=2",
]


def _sft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sft.py"), *args], capture_output=True, text=True, timeout=600)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_resume_and_warm_start(tmp_path):
    first = _sft("--config", QUICKSTART, "stage=position_id", "steps=4", f"run.output_root={tmp_path}", "run.name=a", *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "a"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["stage"] == "position_id" and config["policy"]["position_scheme"] == "condition_id"
    assert config["policy"]["attention"]["temperature"] is True  # the stage's policy, as trained
    assert yaml.safe_load((run / "policy.yaml").read_text()) == config["policy"]
    records = _metrics(run)
    steps = [r for r in records if "loss/total" in r]
    assert [r["iteration"] for r in steps] == [0, 1, 2, 3]
    for key in ("loss/flow", "lr", "grad_norm", "batch_size", "subjects", "epoch"):
        assert key in steps[0], key
    assert [r["iteration"] for r in records if "eval/total" in r] == [0, 2, 4]
    assert (run / "loss_curve.png").is_file() and list((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert [p.name for p in list_checkpoints(run)] == ["iteration-00000002.pt", "iteration-00000004.pt"]
    assert (run / "adapters" / "adapter_config.json").is_file() and (run / "data" / "synthetic" / "manifest.jsonl").is_file()
    assert "fixed-batch loss" in (run / "log.txt").read_text()

    resumed = _sft("--resume", str(run), "steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after step 4" in (run / "log.txt").read_text()
    assert [r["iteration"] for r in _metrics(run) if "loss/total" in r] == list(range(6))
    assert [r["iteration"] for r in _metrics(run) if "eval/total" in r] == [0, 2, 4, 6]

    # the same 6 steps in one go end with exactly the resumed run's adapters
    straight = _sft("--config", QUICKSTART, "stage=position_id", "steps=6", f"run.output_root={tmp_path}", "run.name=b", *SMALL)
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed_state = load_checkpoint(run, restore_rng=False).adapters
    straight_state = load_checkpoint(tmp_path / "b", restore_rng=False).adapters
    assert resumed_state.keys() == straight_state.keys()
    for name in resumed_state:
        torch.testing.assert_close(resumed_state[name], straight_state[name], rtol=0, atol=0)

    # train_gspo.py's warm start: its config names the SFT policy file and adapters; the learner's policy
    # built from that config loads them and holds exactly the trained weights.
    gspo = load_config(GSPOTrainConfig, None, [f"policy={run / 'policy.yaml'}", f"init_adapters={run / 'adapters'}"])
    assert gspo.policy.position_scheme == "condition_id" and gspo.policy.attention.temperature
    policy = FluxPolicy.from_config(gspo.policy)
    policy.load_adapters(gspo.init_adapters)
    loaded = policy.adapter_state()
    assert loaded.keys() == resumed_state.keys()
    for name in loaded:
        torch.testing.assert_close(loaded[name], resumed_state[name], rtol=0, atol=0)


def test_training_refuses_bad_data_naming_the_line(tmp_path):
    made = _sft("make-synthetic", str(tmp_path / "data"), "--samples", "6", "--image-size", "32", "--reference-size", "16")
    assert made.returncode == 0, made.stderr[-2000:]
    manifest = tmp_path / "data" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["subjects"][0]["category"] = "hexagon"
    lines[2] = json.dumps(bad)
    manifest.write_text("\n".join(lines) + "\n")
    result = _sft("--config", QUICKSTART, f"data.manifest={manifest}", "steps=2", f"run.output_root={tmp_path}", "run.name=bad", *SMALL)
    assert result.returncode == 2
    assert f"{manifest}:3:" in result.stderr and "unknown category 'hexagon'" in result.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_warm_start_runs_in_train_gspo(tmp_path):
    """A real train_gspo.py run (local Ray) from an SFT stage's policy file and adapters."""
    sft = _sft("--config", QUICKSTART, "stage=idar", "steps=2", f"run.output_root={tmp_path}", "run.name=sft", *SMALL)
    assert sft.returncode == 0, sft.stderr[-3000:]
    run = tmp_path / "sft"

    # the same two steps through the library's train(cfg) in this process: the script's result exactly
    result = train(load_config(SFTConfig, QUICKSTART, ["stage=idar", "steps=2", f"run.output_root={tmp_path}", "run.name=lib", *SMALL]))
    assert result.run_dir == tmp_path / "lib" and result.completed == 2 and result.adapters == tmp_path / "lib" / "adapters"
    script_evals = [r["eval/total"] for r in _metrics(run) if "eval/total" in r]
    assert [r["eval/total"] for r in _metrics(result.run_dir) if "eval/total" in r] == script_evals
    assert result.summary == {"eval_loss_first": script_evals[0], "eval_loss_last": script_evals[-1]}
    script_state, library_state = load_checkpoint(run, restore_rng=False).adapters, load_checkpoint(result.run_dir, restore_rng=False).adapters
    assert script_state.keys() == library_state.keys()
    for name in script_state:
        assert torch.equal(script_state[name], library_state[name]), name
    gspo = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_gspo.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
         f"policy={run / 'policy.yaml'}", f"init_adapters={run / 'adapters'}", "iterations=1", f"run.output_root={tmp_path}",
         "run.name=rl", "sampler.num_steps=4", "rollout.image_size=32", "rollout.reference_size=16", "rollout.group_size=2",
         "rollout.chunk_size=1", "rollout.groups_per_iteration=1", "tasks.reference_size=16", "workers.cpus_per_worker=0.25"],
        capture_output=True, text=True, timeout=600,
    )
    assert gspo.returncode == 0, gspo.stderr[-3000:]
    assert f"warm start from adapters in {run / 'adapters'}" in (tmp_path / "rl" / "log.txt").read_text()


def test_diptych_stage_builds_its_pairs_and_follows_its_curriculum(tmp_path):
    """The diptych recipe's three streams: single-subject batches, then random pairs (or singles), then
    same-category pairs, the pairs written once into the run folder; every step logs its stream."""
    cfg = load_config(SFTConfig, QUICKSTART, [
        "stage=diptych", "steps=3", "diptych.single_steps=1", "diptych.mixed_steps=1", "diptych.mixed_single_fraction=0",
        "diptych.pairs=4", f"run.output_root={tmp_path}", "run.name=d", *SMALL,
    ])
    result = train(cfg)
    for pairing in ("random", "same_category"):
        manifest = result.run_dir / "data" / f"diptych-{pairing}" / "manifest.jsonl"
        assert len(manifest.read_text().splitlines()) == 4
    train_records = [r for r in _metrics(result.run_dir) if "loss/total" in r]
    assert [r["diptych_source"] for r in train_records] == [0, 1, 2]  # single, random, same_category
    assert [r["subjects"] for r in train_records] == [1, 2, 2]
    config = yaml.safe_load((result.run_dir / "policy.yaml").read_text())
    assert config["dual_branch"]["enabled"] and not config["lora"]["enabled"]
