"""``scripts/reward_server.py`` as users run it: a subprocess binding 127.0.0.1 on an OS-assigned port."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from rewards import ScoreBatch
from rewards.client import RewardClient

pytestmark = pytest.mark.slow  # each test starts Python processes that import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "reward_server.py"


def test_script_serves_the_quickstart_config_with_a_token():
    env = {**os.environ, "QUICKSTART_TOKEN": "s3cret"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "--config",
            str(ROOT / "configs/rewards/quickstart.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "server.token_env=QUICKSTART_TOKEN",
            "weights.jpeg_compressibility=0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the server exited before it started"
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url, "no 'running on' line within 60 s"
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/v1/info").status_code == 401
        # 401 from the headers, before the body: this one announces 10 MB and sends none of it.
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10000000\r\n\r\n"
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 401")
        with RewardClient(url, token="s3cret") as client:
            info = client.info()
            assert info["weights"] == {"colour_target": 1.0, "jpeg_compressibility": 0.1}
            assert info["limits"]["max_request_pixels"] == 128 * 1024 * 1024 and not info["reads_reference_images"]
            result = client.score(ScoreBatch([np.zeros((16, 16, 3), np.uint8)], ["a"]))
            assert set(result.components) == {"colour_target", "jpeg_compressibility"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_script_start_up_errors_are_one_line_and_name_the_problem():
    env = {k: v for k, v in os.environ.items() if k != "REWARD_SERVER_TOKEN"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env
        )

    unknown_key = run("--config", str(ROOT / "configs/rewards/quickstart.yaml"), "weights.colr=1")
    assert (
        unknown_key.returncode == 2 and "weights.colr" in unknown_key.stderr and "colour_target" in unknown_key.stderr
    )
    env_missing = run("--config", str(ROOT / "configs/rewards/multi_human.yaml"))
    assert (
        env_missing.returncode == 2
        and "REWARD_SERVER_TOKEN" in env_missing.stderr
        and "Traceback" not in env_missing.stderr
    )
    quickstart = str(ROOT / "configs/rewards/quickstart.yaml")
    for override, named in (
        ("weights.colour_target=nan", "weights.colour_target: expected a number or null, got 'nan'"),
        ("server.max_request_pixels=1000", "max_request_pixels (1000) must be >= max_image_pixels (16777216)"),
    ):
        refused = run("--config", quickstart, override)
        assert refused.returncode == 2 and named in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert [line for line in refused.stderr.splitlines() if "error" in line] == [refused.stderr.splitlines()[-1]]
