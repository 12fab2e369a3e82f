"""The reward client's retry budget against a real uvicorn on 127.0.0.1: a server restart within the
budget is ridden out (each failed attempt logged), beyond it the client gives up naming the budget."""

from __future__ import annotations

import logging
import socket
import threading
import time

import numpy as np
import pytest

from rewards import RewardConfig, ScoreBatch
from rewards.client import RetryPolicy, RewardClient, RewardServerError
from rewards.config import WeightsConfig
from rewards.server import build_app, running_server

CONFIG = RewardConfig(preset="custom", weights=WeightsConfig(colour_target=1.0))
BATCH = ScoreBatch(images=[np.full((16, 16, 3), 200, dtype=np.uint8)], prompts=["a square"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_restart_longer_than_the_old_retry_window_is_ridden_out(caplog):
    """Down for 5 s, longer than the old fixed window (4 attempts, 0.5 s doubling: about 3.5 s), within a
    budget of 30 s: the request succeeds once the server is back, after logged warnings."""
    port = _free_port()
    served = threading.Event()
    stop = threading.Event()

    def restart_later() -> None:
        time.sleep(5.0)
        with running_server(build_app(CONFIG, {}), port=port):
            served.set()
            stop.wait(60)

    thread = threading.Thread(target=restart_later, daemon=True)
    thread.start()
    try:
        budget = RetryPolicy(attempts=50, backoff_s=0.2, max_backoff_s=1.0, deadline_s=30.0)
        with caplog.at_level(logging.WARNING, logger="rewards.client"), RewardClient(f"http://127.0.0.1:{port}", retry=budget, connect_timeout_s=1.0) as client:
            started = time.monotonic()
            result = client.score(BATCH)
        assert served.is_set() and time.monotonic() - started >= 5.0
        assert np.isfinite(result.rewards).all()
        warnings = [r.getMessage() for r in caplog.records if r.name == "rewards.client"]
        assert len(warnings) >= 3 and all("retrying in" in w for w in warnings)
        with RewardClient(f"http://127.0.0.1:{_free_port()}", retry=RetryPolicy(), connect_timeout_s=1.0) as old:
            with pytest.raises(RewardServerError, match="failed after 4 attempts"):  # the old window gives up
                old.score(BATCH)
    finally:
        stop.set()
        thread.join(timeout=30)


def test_the_deadline_ends_the_retries_naming_the_budget():
    budget = RetryPolicy(attempts=1000, backoff_s=0.2, max_backoff_s=0.4, deadline_s=2.0)
    with RewardClient(f"http://127.0.0.1:{_free_port()}", retry=budget, connect_timeout_s=0.5) as client:
        started = time.monotonic()
        with pytest.raises(RewardServerError, match=r"retry budget \(attempts 1000, deadline 2 s\)"):
            client.score(BATCH)
    assert 1.0 <= time.monotonic() - started <= 4.0
