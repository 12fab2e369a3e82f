"""Resuming a run folder: the newest intact checkpoint (checksummed, fsynced, failed writes named in one
line), a cut metrics line, a config that may not change the trained state and is written only once the
checkpoint has loaded, one writer at a time, default names that never collide."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import yaml

from rl_align.core.checkpoints import (
    Checkpoint, checkpoint_dir, list_checkpoints, load_checkpoint, remove_stale_files, save_checkpoint,
)
from rl_align.core.config import load_config
from rl_align.core.errors import RunFolderError
from rl_align.core.runs import RunConfig, RunLock, create_run_dir
from rl_align.core.tracking import MetricsLog, read_metrics
from rl_align.sft.config import SFTConfig
from rl_align.sft.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "sft" / "quickstart.yaml"
SMALL = [
    "data.synthetic.samples=16", "data.synthetic.image_size=32", "data.target_size=32", "data.synthetic.reference_size=16",
    "data.reference_size=16", "output.eval_every=2", "output.sample_every=2", "output.checkpoint_every=2", "output.plot_every=2",
    "output.sample_steps=2",
]
_spec = importlib.util.spec_from_file_location("sft_script", ROOT / "scripts" / "sft.py")
SFT_SCRIPT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SFT_SCRIPT)
HOLD_LOCK = "import sys; from rl_align.core.runs import RunLock; lock = RunLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()"


def _save(run_dir: Path, *completed: int) -> None:
    for c in completed:
        save_checkpoint(run_dir, Checkpoint(c, {"w": torch.full((64,), float(c))}, {"step": c}), keep=10)


def _cut(path: Path) -> None:
    """Keep the first half of ``path``, as a crash or a full disk leaves it."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---- checkpoints ----------------------------------------------------------------------------------------


def test_resume_takes_the_newest_intact_checkpoint(tmp_path, caplog):
    _save(tmp_path, 2, 4, 6)
    folder = checkpoint_dir(tmp_path)
    for completed in (2, 4):  # as written before checksums: intact when they load
        (folder / f"iteration-{completed:08d}.pt.sha256").unlink()
    flipped = bytearray((folder / "iteration-00000006.pt").read_bytes())
    flipped[len(flipped) // 2] ^= 1  # still loads: the checksum alone sees it
    (folder / "iteration-00000006.pt").write_bytes(bytes(flipped))
    _cut(folder / "iteration-00000004.pt")
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(tmp_path, restore_rng=False)
    assert state.completed == 2 and torch.equal(state.adapters["w"], torch.full((64,), 2.0))
    assert f"checkpoint {folder / 'iteration-00000006.pt'} is damaged: its SHA-256" in caplog.text
    assert f"checkpoint {folder / 'iteration-00000004.pt'} is damaged: it does not load" in caplog.text
    assert f"using {folder / 'iteration-00000002.pt'}, the newest intact checkpoint (2 completed)" in caplog.text


def test_no_intact_checkpoint_is_one_error_naming_them(tmp_path):
    _save(tmp_path, 2, 4)
    for path in list_checkpoints(tmp_path):
        _cut(path)
    with pytest.raises(RunFolderError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"no intact checkpoint in {checkpoint_dir(tmp_path)}; damaged: iteration-00000004.pt, iteration-00000002.pt")
    assert "\n" not in message
    with pytest.raises(RunFolderError, match="iteration-00000002.pt is damaged"):
        load_checkpoint(checkpoint_dir(tmp_path) / "iteration-00000002.pt")


def test_save_fsyncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(dst))), replace(src, dst))[1])
    _save(tmp_path, 2)
    folder = checkpoint_dir(tmp_path)
    path = folder / "iteration-00000002.pt"
    assert events == [
        ("fsync", f"{path}.partial"), ("fsync", f"{path}.sha256.partial"), ("replace", f"{path}.sha256"), ("replace", str(path)),
        ("fsync", str(folder)),
    ]


@pytest.mark.parametrize("failure", ["disk full", "read-only"])
def test_a_failed_save_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch, failure):
    _save(tmp_path, 2)
    path = checkpoint_dir(tmp_path) / "iteration-00000004.pt"
    if failure == "disk full":
        Path(f"{path}.partial").symlink_to("/dev/full")  # every write fails with ENOSPC
    else:
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(RunFolderError) as info:
        _save(tmp_path, 4)
    reason = os.strerror(errno.ENOSPC if failure == "disk full" else errno.EROFS)
    assert str(info.value) == f"cannot write checkpoint {path}: {reason}"
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["iteration-00000002.pt", "iteration-00000002.pt.sha256"]


def test_stale_files_of_interrupted_saves_are_removed(tmp_path):
    _save(tmp_path, 2)
    folder = checkpoint_dir(tmp_path)
    stale = [folder / "iteration-00000004.pt.partial", folder / "iteration-00000004.pt.sha256"]  # cut after its checksum
    for path in stale:
        path.write_text("x")
    assert remove_stale_files(tmp_path) == stale
    assert sorted(p.name for p in folder.iterdir()) == ["iteration-00000002.pt", "iteration-00000002.pt.sha256"]


# ---- metrics, run folders, locks ------------------------------------------------------------------------


def test_a_cut_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    with MetricsLog(tmp_path, tensorboard=False) as metrics:
        for it in range(3):
            metrics.write(it, {"x": it})
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as file:
        file.write('{"iteration": 3, "x"')
    with caplog.at_level(logging.WARNING):
        assert [r["iteration"] for r in read_metrics(path)] == [0, 1, 2]
    assert f"{path}:4: not valid JSON" in caplog.text
    with MetricsLog(tmp_path, resume_from=3, tensorboard=False) as metrics:
        metrics.write(3, {"x": 30})
    assert read_metrics(path)[-1] == {"iteration": 3, "x": 30.0}

    path.write_text('{"iteration": 0}\n{"iteration": 1, \n{"iteration": 2}\n')
    with pytest.raises(RunFolderError, match=f"^{path}:2: not valid JSON"):
        read_metrics(path)


def test_a_full_disk_under_the_metrics_log_is_one_line_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    metrics = MetricsLog(tmp_path, tensorboard=False)
    with pytest.raises(RunFolderError) as info:
        metrics.write(0, {"x": 1.0})
    assert str(info.value) == f"cannot write metrics {tmp_path / 'metrics.jsonl'}: {os.strerror(errno.ENOSPC)}"


def test_default_run_names_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *args: "20260101-120000")
    run = RunConfig(output_root=str(tmp_path))
    folders = [create_run_dir(run, run, prefix="sft") for _ in range(3)]
    assert [f.name for f in folders] == ["sft-20260101-120000", "sft-20260101-120000-2", "sft-20260101-120000-3"]
    assert all((f / "config.yaml").is_file() for f in folders)


def test_one_writer_per_run_folder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderError, match=f"^run folder {tmp_path} is being written by PID {os.getpid()} on {socket.gethostname()} \\(since "):
            RunLock(tmp_path)
    RunLock(tmp_path).release()  # free again once released


# ---- the trainers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step SFT run with checkpoints after steps 2 and 4."""
    root = tmp_path_factory.mktemp("sft")
    train(load_config(SFTConfig, QUICKSTART, ["steps=4", f"run.output_root={root}", "run.name=a", *SMALL]))
    return root / "a"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _resume(run: Path, capsys, *overrides: str) -> tuple[int, str]:
    """scripts/sft.py --resume in this process: its exit code and the last line it printed to stderr."""
    capsys.readouterr()
    code = SFT_SCRIPT.main(["--resume", str(run), *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def _contents(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in [run / "config.yaml", run / "policy.yaml", run / "metrics.jsonl", *list_checkpoints(run)]}


@pytest.mark.parametrize("override", ["policy.lora.rank=4", "run.seed=1", "optim.learning_rate=0.001", "data.batch_size=1"])
def test_a_resume_that_changes_the_trained_state_is_refused(run, capsys, override):
    before = _contents(run)
    key = override.partition("=")[0]
    code, line = _resume(run, capsys, override, "steps=6")
    assert code == 2
    assert line.startswith(f"sft: cannot run: cannot resume {run} with {key} (") and "steps" not in line.partition(":")[2].partition(":")[0]
    assert _contents(run) == before and not (run / "resume_log.jsonl").exists()


def test_a_failed_resume_leaves_config_yaml_as_it_was(run, capsys):
    for path in list_checkpoints(run):
        _cut(path)
    before = _contents(run)
    code, line = _resume(run, capsys, "steps=6")
    assert code == 2 and line.startswith(f"sft: cannot run: no intact checkpoint in {run / 'checkpoints'}")
    assert _contents(run) == before and not (run / "resume_log.jsonl").exists()


def test_resume_after_the_newest_intact_checkpoint_records_its_changes(run, capsys):
    newest = run / "checkpoints" / "iteration-00000004.pt"
    _cut(newest)
    stale = run / "checkpoints" / "iteration-00000006.pt.partial"
    stale.write_text("cut")
    with (run / "metrics.jsonl").open("a") as file:
        file.write('{"iteration": 4, "loss/to')
    saved = yaml.safe_load((run / "config.yaml").read_text())
    code, _ = _resume(run, capsys, "steps=5", "output.checkpoint_every=3", "output.plot_every=10", "output.sample_every=10")
    assert code == 0
    log = (run / "log.txt").read_text()
    assert f"checkpoint {newest} is damaged" in log and "resumed after step 2" in log
    assert f"{run / 'metrics.jsonl'}:8: not valid JSON" in log and not stale.exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss/total" in r] == list(range(5))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config == {**saved, "steps": 5, "output": {**saved["output"], "checkpoint_every": 3, "plot_every": 10, "sample_every": 10}}
    entries = [json.loads(line) for line in (run / "resume_log.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["resumed_after"] == 2
    assert entries[0]["changes"] == {
        "steps": [4, 5], "output.sample_every": [2, 10], "output.checkpoint_every": [2, 3], "output.plot_every": [2, 10],
    }


def test_a_second_writer_is_refused_naming_the_first(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = _contents(run)
        code, line = _resume(run, capsys, "steps=6")
        assert code == 2
        assert line.startswith(f"sft: cannot run: run folder {run} is being written by PID {holder.pid} on {socket.gethostname()} (since ")
        assert _contents(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert _resume(run, capsys)[0] == 0  # the kernel dropped the killed writer's lock


def test_ippo_resume_checks_its_config_first_and_records_it_after_loading(tmp_path):
    from rl_align.ippo.config import GSPOTrainConfig
    from rl_align.ippo.trainer import open_run, restore

    quickstart = ROOT / "configs" / "quickstart.yaml"
    with ExitStack() as held:
        run = open_run(load_config(GSPOTrainConfig, quickstart, [f"run.output_root={tmp_path}", "run.name=r", "iterations=3"]), None, held)
    save_checkpoint(run, Checkpoint(3, {}, {}))
    before = (run / "config.yaml").read_bytes()
    for override in ("rollout.group_size=16", "sampler.eta=0.5", "learner.learning_rate=0.1", "run.seed=7"):
        resumed = load_config(GSPOTrainConfig, run / "config.yaml", [override, "iterations=5"])
        with ExitStack() as held, pytest.raises(RunFolderError, match=f"cannot resume {run} with {override.partition('=')[0]} \\("):
            open_run(resumed, run, held)

    class Workers:
        def __init__(self, error: Exception | None = None):
            self.error, self.restored = error, None

        def restore(self, checkpoint: Checkpoint) -> None:
            if self.error:
                raise self.error
            self.restored = checkpoint.completed

    resumed = load_config(GSPOTrainConfig, run / "config.yaml", ["iterations=5", "output.sample_every=5"])
    with ExitStack() as held:
        assert open_run(resumed, run, held) == run
        assert (run / "config.yaml").read_bytes() == before
        with pytest.raises(RuntimeError, match="size mismatch"):
            restore(Workers(RuntimeError("size mismatch")), resumed, run, True)
        assert (run / "config.yaml").read_bytes() == before
        workers = Workers()
        assert restore(workers, resumed, run, True) == 3 and workers.restored == 3
    assert load_config(GSPOTrainConfig, run / "config.yaml") == resumed
    entry = json.loads((run / "resume_log.jsonl").read_text())
    assert entry["resumed_after"] == 3 and entry["changes"] == {"iterations": [3, 5], "output.sample_every": [10, 5]}
