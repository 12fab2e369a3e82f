"""Serve the composite reward over REST.

    python scripts/reward_server.py --config configs/rewards/quickstart.yaml --host 127.0.0.1 --port 8000 [k=v ...]
    python scripts/reward_server.py --config configs/rewards/multi_human.yaml --ray  # Ray Serve (server.ray_*)

Binds 127.0.0.1 unless told otherwise. Set server.token_env to the name of an environment variable
holding a bearer token to require it on /v1/*. Memory follows server.max_request_pixels (the pixels one
request may declare) and server.max_batches_in_flight; the bound is printed at start-up. A config the
server cannot run (an unknown key, a non-finite weight, inconsistent limits, a missing model file, an
unset token variable) stops it with one line naming the problem.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards.config import RewardConfig  # noqa: E402
from rl_align.core.config import ConfigError, apply_overrides, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML reward config (configs/rewards/*.yaml)")
    parser.add_argument("--host", help="bind address (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: server.port; 0 picks a free one)")
    parser.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of a single uvicorn")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(RewardConfig, args.config, args.overrides)
        if args.host is not None:
            cfg = apply_overrides(cfg, [f"server.host={args.host}"])
        if args.port is not None:
            cfg = apply_overrides(cfg, [f"server.port={args.port}"])
    except ConfigError as exc:
        parser.error(str(exc))

    if args.ray:
        import ray
        from ray import serve

        from rewards.ray_serve import reward_deployment

        ray.init()
        serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
        serve.run(reward_deployment(cfg), route_prefix="/")
        print(f"reward server on Ray Serve at http://{cfg.server.host}:{cfg.server.port}", flush=True)
        while True:
            time.sleep(3600)

    import uvicorn

    from rewards.server import build_app, decode_memory_bound

    try:
        app = build_app(cfg, dict(os.environ))
    except (FileNotFoundError, ValueError) as exc:  # a missing model file, an unset token variable, a nan weight
        parser.exit(2, f"reward_server: cannot start: {exc}\n")
    limits = cfg.server
    print(
        f"reward_server: decoding holds at most {decode_memory_bound(limits) / 1e9:.2f} GB "
        f"(max_batches_in_flight={limits.max_batches_in_flight} x (3 B x max_request_pixels={limits.max_request_pixels}"
        f" + 11 B x max_image_pixels={limits.max_image_pixels})), plus the bodies in flight "
        f"(max_request_bytes={limits.max_request_bytes} each)",
        flush=True,
    )
    uvicorn.run(app, host=cfg.server.host, port=cfg.server.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
