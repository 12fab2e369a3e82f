"""The reward server's app as a Ray Serve deployment on a local Ray (loopback only)."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import numpy as np
import pytest

from rewards import RewardConfig, ScoreBatch, build_reward
from rewards.client import RewardClient
from rewards.ray_serve import reward_deployment
from rl_align.core.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "rewards"


def _free_loopback_port() -> int:
    # Serve's proxy needs a concrete port; the OS picks a free one.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic deprecations inside Ray Serve's own config
def test_ray_serve_deployment_serves_the_same_app():
    import ray
    from ray import serve

    cfg = load_config(
        RewardConfig, CONFIGS / "quickstart.yaml", ["server.ray_replicas=1", "server.ray_gpus_per_replica=0"]
    )
    port = _free_loopback_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(reward_deployment(cfg), name="rewards", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        rng = np.random.default_rng(0)
        batch = ScoreBatch([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)], ["a", "b", "c"])
        with RewardClient(url, timeout_s=60) as client:
            assert client.info()["weights"] == {"colour_target": 1.0}
            np.testing.assert_allclose(client.score(batch).rewards, build_reward(cfg).score(batch).rewards, rtol=1e-12)
        bad = httpx.post(f"{url}/v1/score", json={"images": ["%%"], "prompts": ["a"], "references": [[]]}, timeout=60)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "images", 0]
    finally:
        serve.shutdown()
        ray.shutdown()
