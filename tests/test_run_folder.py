"""Run-folder outputs: metrics log, TensorBoard events, plots, image grids and checkpoints."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_align.core.checkpoints import Checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from rl_align.core.tracking import MetricsLog, due, plot_curves, read_metrics, save_image_grid


def test_metrics_jsonl_and_tensorboard(tmp_path):
    with MetricsLog(tmp_path) as metrics:
        for it in range(5):
            metrics.write(it, {"reward/mean": it * 0.5, "loss": float("nan") if it == 2 else -it})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(5))
    assert records[3] == {"iteration": 3, "reward/mean": 1.5, "loss": -3.0}
    assert records[2]["loss"] is None  # NaN is recorded as null, never as invalid JSON
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("reward/mean")] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_resume_drops_the_iterations_that_will_be_redone(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as metrics:
        for it in range(6):
            metrics.write(it, {"x": it})
    with MetricsLog(tmp_path, resume_from=4, tensorboard=False) as metrics:
        metrics.write(4, {"x": 40})
    assert [(r["iteration"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 40)]


def test_plot_and_grid_files(tmp_path):
    records = [{"iteration": i, "reward/mean": float(np.sin(i / 5))} for i in range(40)]
    plot_curves(records, ["reward/mean", "absent"], tmp_path / "curve.png", title="t", smooth=5)
    assert Image.open(tmp_path / "curve.png").size[0] > 100
    images = np.stack([np.full((16, 20, 3), 40 * i, np.uint8) for i in range(6)])
    save_image_grid(images, tmp_path / "grid.png", columns=3, captions=[f"s{i}" for i in range(6)])
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * (16 + 12), 3 * 20, 3)
    assert (grid[12 + 8, 20 + 10] == 40).all() and (grid[28 + 12 + 8, 2 * 20 + 10] == 200).all()  # image 1 and 5
    with pytest.raises(ValueError, match="uint8"):
        save_image_grid(images.astype(np.float32), tmp_path / "bad.png", columns=3)


def test_checkpoints_are_atomic_rotated_and_restore_rng(tmp_path):
    weights = {"lora.A": torch.randn(4, 2)}
    for it in (10, 20, 30, 40):
        save_checkpoint(tmp_path, Checkpoint(it, weights, {"step": it}), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iteration-00000030.pt", "iteration-00000040.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [  # each with its checksum, no .partial left
        "iteration-00000030.pt", "iteration-00000030.pt.sha256", "iteration-00000040.pt", "iteration-00000040.pt.sha256",
    ]

    torch.manual_seed(5)
    random.seed(5)
    save_checkpoint(tmp_path, Checkpoint(50, weights, {"step": 50}, data_positions=({"main": {"epoch": 2}},)))
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    state = load_checkpoint(tmp_path)  # the newest of the run folder
    assert state.completed == 50 and torch.equal(state.adapters["lora.A"], weights["lora.A"])
    assert state.optimizer == {"step": 50} and state.data_positions == ({"main": {"epoch": 2}},)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_missing_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        load_checkpoint(tmp_path)


def test_due_counts_updates_and_always_fires_at_the_end():
    # IPPO samples the rollouts of iterations 0, 2, 4 and the last (count = updates behind them, last = 6)
    assert [i for i in range(7) if due(i, 2, 6)] == [0, 2, 4, 6]
    # checkpoints after 3, 6 and the final 7 updates: the end fires even off the cadence
    assert [done for done in range(1, 8) if due(done, 3, 7)] == [3, 6, 7]
    assert [done for done in range(1, 5) if due(done, 1, 4)] == [1, 2, 3, 4]
