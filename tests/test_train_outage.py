"""IPPO training against failures, on a local Ray cluster: a worker that cannot start is one SetupError;
a reward-server outage (the real server on 127.0.0.1) beyond the training config's retry budget saves a
checkpoint and stops with a message saying how to resume, and one within the budget is ridden out."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import ray
from fastapi.responses import JSONResponse

from rewards.client import RetryPolicy
from rewards.server import build_app, running_server
from rl_align.core.checkpoints import list_checkpoints
from rl_align.core.config import load_config
from rl_align.core.errors import RunStopped, SetupError
from rl_align.core.tiny_base import TinyBaseConfig, build_tiny_base
from rl_align.core.tracking import read_metrics
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.ippo.trainer import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "iterations=2", "sampler.num_steps=4", "rollout.image_size=32", "rollout.reference_size=16", "rollout.group_size=2",
    "rollout.chunk_size=2", "rollout.groups_per_iteration=1", "learner.minibatches=1", "tasks.reference_size=16", "workers.cpus_per_worker=0.25",
    "output.sample_every=10", "output.checkpoint_every=10", "output.plot_every=10",
    "workers.reward_request_timeout_s=10", "workers.reward_timeout_s=120",
]


class Outage:
    """An ASGI wrapper: /v1/score answers 503 for ``seconds`` from its first request on (a restarting server)."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds, self.began, self.refused = app, seconds, None, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/score":
            self.began = self.began or time.monotonic()
            if time.monotonic() - self.began < self.seconds:
                self.refused += 1
                await JSONResponse({"detail": "restarting"}, status_code=503)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local cluster for the module's runs (a trainer leaves a cluster it did not start running)."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> GSPOTrainConfig:
    base = build_tiny_base(TinyBaseConfig(steps=2, batch_size=2, sample_steps=1), tmp_path_factory.mktemp("base") / "tiny-base")
    return load_config(GSPOTrainConfig, ROOT / "configs" / "quickstart.yaml", [*SMALL, f"policy.path={base}"])


def _with(cfg: GSPOTrainConfig, tmp_path: Path, url: str, retry: RetryPolicy) -> GSPOTrainConfig:
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, output_root=str(tmp_path), name="outage"),
        workers=dataclasses.replace(cfg.workers, reward_url=url, reward_retry=retry),
    )


def test_an_outage_beyond_the_budget_stops_the_run_and_one_within_it_is_ridden_out_on_resume(config, tmp_path):
    """Beyond a 2 s budget: a checkpoint, a stop naming how to resume. The resumed run then meets 5 s of
    503s, longer than the old fixed retry window (about 3.5 s), within a 60 s budget: it completes."""
    with running_server(Outage(build_app(config.reward, {}), seconds=1e9)) as url:
        cfg = _with(config, tmp_path, url, RetryPolicy(attempts=100, backoff_s=0.2, max_backoff_s=0.5, deadline_s=2.0))
        with pytest.raises(RunStopped) as stopped:
            train(cfg)
    run_dir = tmp_path / "outage"
    message = str(stopped.value)
    assert "retry budget" in message and "checkpoint after iteration 0" in message and f"--resume {run_dir}" in message
    assert [p.name for p in list_checkpoints(run_dir)] == ["iteration-00000000.pt"]

    restarting = Outage(build_app(config.reward, {}), seconds=5.0)
    with running_server(restarting) as url:
        patient = dataclasses.replace(cfg.workers, reward_url=url, reward_retry=RetryPolicy(attempts=100, backoff_s=0.2, max_backoff_s=1.0, deadline_s=60.0))
        result = train(dataclasses.replace(cfg, workers=patient), resume=run_dir)
    assert restarting.refused >= 3
    assert [r["iteration"] for r in read_metrics(result.run_dir / "metrics.jsonl")] == [0, 1]


def test_a_worker_that_cannot_start_is_one_setup_error(config, tmp_path):
    """A setting only a worker's constructor can check (an image size the codec cannot pack) stops the
    start-up with one line naming the key, not an actor traceback in the first iteration."""
    cfg = dataclasses.replace(config, run=dataclasses.replace(config.run, output_root=str(tmp_path)), rollout=dataclasses.replace(config.rollout, image_size=30))
    with pytest.raises(SetupError, match=r"a worker failed to start: .*rollout.image_size: image size 30x30 must be a multiple of 4"):
        train(cfg)
