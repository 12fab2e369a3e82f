"""Data-parallel SFT: ranks that each step on their own batch take exactly the step of the mean over all
their samples, and scripts/sft.py under torchrun (gloo on CPU) writes one run folder and resumes."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from policies import FluxPolicy
from rl_align.core.checkpoints import list_checkpoints, load_checkpoint
from rl_align.core.distributed import Communicator
from rl_align.core.optim import make_optimizer
from rl_align.sft.objective import StageObjective, train_step
from rl_align.sft.builders import build_synthetic_manifest
from rl_align.sft.config import OptimConfig, SFTConfig
from rl_align.sft.data import BatchStream, SFTDataConfig
from rl_align.sft.manifest import load_manifest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DATA = SFTDataConfig(target_size=32, reference_size=16, size_multiple=16, batch_size=4)
CFG = SFTConfig(stage="idar", data=DATA, optim=OptimConfig(learning_rate=1e-2))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_step(rank: int, world: int, port: int, cfg: SFTConfig, batches, keys, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ranks = Communicator(rank, world, torch.device("cpu"))
    policy = FluxPolicy.from_config(cfg.policy)
    sharded = cfg.sharding == "fsdp"
    if sharded:
        policy.shard_transformer()
    objective, optimizer = StageObjective(policy, cfg), make_optimizer(policy.trainable_parameters(), cfg.optim)
    count = torch.tensor([float(len(batches[rank].prompts))])
    ranks.all_reduce(count)
    stats = train_step(objective, optimizer, batches[rank], keys[rank], cfg.optim.learning_rate, total_samples=int(count),
                       all_reduce=ranks.all_reduce, sharded=sharded)
    torch.save({"adapters": policy.adapter_state(), "total": float(stats.terms.total), "grad_norm": stats.grad_norm}, Path(out_dir) / f"{rank}.pt")
    ranks.close()


# position_id groups a batch by phrase spans and condition ids: the 3-sample share makes more model calls than
# the 1-sample one, which sharded processes must pad (zero-weight calls) to stay in step
SHARDED = dataclasses.replace(CFG, stage="position_id", sharding="fsdp", checkpoint_blocks=True)


@pytest.mark.parametrize("cfg", [CFG, SHARDED], ids=["replicated-idar", "sharded-position-id"])
def test_data_parallel_step_equals_the_step_on_all_samples(tmp_path, cfg):
    manifest = build_synthetic_manifest(tmp_path / "data", 12, 2, 2, 32, 16, seed=0)
    stream = BatchStream(load_manifest(manifest), manifest.parent, DATA, seed=0)
    planned = [p for batch in stream.plan(0) for p in batch]
    batches = [stream.load(planned[:3]), stream.load(planned[3:4])]  # unequal shares: 3 and 1 samples
    keys = [11, 22]
    mp.spawn(_rank_step, args=(2, _free_port(), cfg, batches, keys, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]

    # one process: the same two batches back-propagated with weights 3/4 and 1/4, then one step
    policy = FluxPolicy.from_config(cfg.policy)
    objective, optimizer = StageObjective(policy, cfg), make_optimizer(policy.trainable_parameters(), cfg.optim)
    if cfg.sharding == "fsdp":
        assert len(objective.groups(batches[0])) > len(objective.groups(batches[1])) == 1
    optimizer.zero_grad()
    totals = [float(objective.batch_loss(batch, key, backward=True, scale=len(batch.prompts) / 4).total) for batch, key in zip(batches, keys)]
    params = policy.trainable_parameters()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm))
    optimizer.step()
    expected = policy.adapter_state()
    for result in results:
        assert result["total"] == pytest.approx(0.75 * totals[0] + 0.25 * totals[1], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
        for name, value in expected.items():
            torch.testing.assert_close(result["adapters"][name], value, rtol=1e-5, atol=1e-6)
    for name in expected:  # the ranks agree exactly with each other
        assert torch.equal(results[0]["adapters"][name], results[1]["adapters"][name])


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               str(ROOT / "scripts" / "sft.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


SMALL = ["data.synthetic.samples=16", "data.synthetic.image_size=32", "data.target_size=32", "data.synthetic.reference_size=16",
         "data.reference_size=16", "data.batch_size=2", "output.eval_every=2", "output.sample_every=2", "output.checkpoint_every=2",
         "output.sample_steps=2"]


@pytest.mark.parametrize("sharding", [[], ["sharding=fsdp", "checkpoint_blocks=true"]], ids=["replicated", "sharded"])
def test_torchrun_writes_one_run_folder_and_resumes_exactly(tmp_path, sharding):
    quickstart = str(ROOT / "configs" / "sft" / "quickstart.yaml")
    straight = _torchrun("--config", quickstart, "stage=idar", "steps=4", f"run.output_root={tmp_path}", "run.name=straight", *SMALL, *sharding)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "straight"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["straight"]  # one folder for both processes
    log = (run / "log.txt").read_text()
    assert "2 process(es) on cpu" in log and log.count("fixed-batch loss total") == 3  # steps 0, 2, 4: rank 0 only
    assert ("transformer sharded over 2 processes" in log) == bool(sharding)
    state = load_checkpoint(run, restore_rng=False)
    assert len(state.data_positions) == 2  # each process's data position

    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    first = _torchrun("--config", quickstart, "stage=idar", "steps=2", f"run.output_root={tmp_path}", "run.name=resumed", *SMALL, *sharding)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun("--resume", str(tmp_path / "resumed"), "steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ends = [load_checkpoint(list_checkpoints(tmp_path / name)[-1], restore_rng=False).adapters for name in ("straight", "resumed")]
    for name in ends[0]:
        torch.testing.assert_close(ends[0][name], ends[1][name], rtol=0, atol=0)

    single = subprocess.run([sys.executable, str(ROOT / "scripts" / "sft.py"), "--resume", str(run), "steps=6"], capture_output=True, text=True, timeout=600)
    assert single.returncode == 2 and "written by 2 process(es)" in single.stderr
