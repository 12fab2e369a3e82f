"""The reward server's FastAPI app as a Ray Serve deployment: each replica loads the reward models once
and serves the same endpoints; ``server.ray_gpus_per_replica: 1`` places one replica per GPU."""

from __future__ import annotations

import os
from typing import Any

from rewards.config import RewardConfig


def reward_deployment(cfg: RewardConfig) -> Any:
    """A bound Ray Serve application; run it with ``serve.run(reward_deployment(cfg), route_prefix="/")``."""
    from ray import serve

    from rewards.server import build_app

    @serve.ingress()
    class RewardServer:
        def __init__(self, config: RewardConfig):
            self.config = config

        def __serve_build_asgi_app__(self):  # Ray Serve calls this on the replica, after __init__
            return build_app(self.config, dict(os.environ))

    deployment = serve.deployment(
        RewardServer,
        name="reward_server",
        num_replicas=cfg.server.ray_replicas,
        ray_actor_options={"num_gpus": cfg.server.ray_gpus_per_replica},
    )
    return deployment.bind(cfg)
