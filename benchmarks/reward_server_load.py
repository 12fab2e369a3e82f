"""The reward server under load and at its limits, measured on the real server: scripts/reward_server.py in
a subprocess (uvicorn on 127.0.0.1, an OS-assigned port, a bearer token) with the weight-free quickstart
reward (colour_target: no model files), so the server's own memory can be read from /proc.

1. Load: latency p50/p99 and throughput of --clients concurrent clients (threads, httpx), each sending
   --requests requests of --batch PNG images of --size px.
2. Memory: the peak RSS of the server process (VmHWM, reset before each phase through
   /proc/<pid>/clear_refs) for the largest request the configured limits allow (images of
   max_image_pixels filling max_request_pixels), one at a time and --worst-concurrent at once, printed
   beside the budget (3 B x max_request_pixels) and the bound rewards.server.decode_memory_bound.
3. The request the per-image limits alone would allow (max_images x (1 + max_references_per_image) images
   of max_image_pixels, the issue's 42.8 MB body): its answer (413 naming the budget), time and peak.
4. Authentication before the body: the time to the 401 of an unauthenticated request announcing that
   body; /healthz latency while the authenticated body is sent and refused.

    python benchmarks/reward_server_load.py [--clients 20] [--requests 10] [--batch 8] [--size 128]
        [--max-request-pixels N] [--max-image-pixels N] [--worst-concurrent 3]

Prints figures and ratios; no thresholds. About a minute on 2 cores at the defaults (peak ~1.7 GB).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewards.config import ServerConfig  # noqa: E402
from rewards.server import decode_memory_bound  # noqa: E402

SCRIPT = ROOT / "scripts" / "reward_server.py"
QUICKSTART = ROOT / "configs" / "rewards" / "quickstart.yaml"
MB = 1e6


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def smooth_image(size: int, seed: int) -> np.ndarray:
    """A smooth random image (like a decoder's output, so PNG sizes are realistic)."""
    low = np.random.default_rng(seed).integers(0, 256, size=(max(size // 8, 1), max(size // 8, 1), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR))


def body(images: list[str], references_per_image: int = 0, reference: str = "") -> dict:
    ref = {"image": reference, "kind": "object", "caption": "a subject"}
    return {"images": images, "prompts": ["a photo"] * len(images), "references": [[ref] * references_per_image for _ in images]}


class Server:
    """scripts/reward_server.py in a subprocess; its output is drained by a thread (uvicorn logs every request)."""

    def __init__(self, overrides: list[str], token: str):
        env = {**os.environ, "BENCH_REWARD_TOKEN": token}
        command = [sys.executable, str(SCRIPT), "--config", str(QUICKSTART), "--host", "127.0.0.1", "--port", "0"]
        command += ["server.token_env=BENCH_REWARD_TOKEN", *overrides]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        started = threading.Event()

        def drain() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
                if match:
                    self.url = match.group(1)
                    started.set()
            started.set()

        threading.Thread(target=drain, daemon=True).start()
        if not started.wait(120) or self.url is None:
            self.close()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-20:]))

    def _status(self, key: str) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024

    def rss(self) -> int:
        return self._status("VmRSS")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)

    def peak(self) -> int:
        return self._status("VmHWM")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def load_phase(server: Server, headers: dict, clients: int, requests: int, batch: int, size: int) -> None:
    payloads = [body([png_base64(smooth_image(size, seed * batch + i)) for i in range(batch)]) for seed in range(clients)]
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=600) as http:
            http.post("/v1/score", json=payloads[k])  # warm: connection, first-call allocations
            barrier.wait()
            for _ in range(requests):
                start = time.perf_counter()
                response = http.post("/v1/score", json=payloads[k])
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    statuses.append(response.status_code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    server.reset_peak()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    done = len(latencies)
    ok = statuses.count(200)
    print(
        f"load: {clients} clients x {requests} requests of {batch} x {size}px PNG ({len(payloads[0]['images'][0]) / 1e3:.0f} kB "
        f"base64 each): {ok}/{done} HTTP 200; latency p50 {percentile(latencies, 50) * 1e3:.1f} ms, "
        f"p99 {percentile(latencies, 99) * 1e3:.1f} ms, mean {statistics.mean(latencies) * 1e3:.1f} ms; "
        f"throughput {done / wall:.1f} requests/s = {done * batch / wall:.0f} images/s; "
        f"server peak RSS {server.peak() / MB:.0f} MB"
    )


def post_concurrently(server: Server, headers: dict, payload: dict, n: int) -> tuple[list[int], float, list[str]]:
    results: list[tuple[int, str]] = []

    def send() -> None:
        response = httpx.post(f"{server.url}/v1/score", json=payload, headers=headers, timeout=600)
        results.append((response.status_code, response.text[:160]))

    threads = [threading.Thread(target=send) for _ in range(n)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [status for status, _ in results], time.perf_counter() - start, [text for _, text in results]


def memory_phase(server: Server, headers: dict, limits: ServerConfig, concurrent: int) -> dict:
    side = math.isqrt(limits.max_image_pixels)
    n = max(1, min(limits.max_images, limits.max_request_pixels // (side * side)))
    big = png_base64(np.full((side, side, 3), (230, 120, 40), np.uint8))  # small PNG, max_image_pixels decoded
    worst = body([big] * n)
    budget_bytes = 3 * limits.max_request_pixels
    bound = decode_memory_bound(limits)
    # colour_target's scratch while it scores one image: float32 copies (x / 255, x - c, |x - c|), 36 B/px.
    scoring = 36 * limits.max_image_pixels
    baseline = server.rss()
    print(
        f"limits: max_request_pixels={limits.max_request_pixels} (budget: {budget_bytes / MB:.0f} MB of RGB), "
        f"max_image_pixels={limits.max_image_pixels}, max_batches_in_flight={limits.max_batches_in_flight}, "
        f"max_request_bytes={limits.max_request_bytes}; decode_memory_bound {bound / MB:.0f} MB + colour_target's "
        f"scratch for one image {scoring / MB:.0f} MB = {(bound + scoring) / MB:.0f} MB; server RSS at rest {baseline / MB:.0f} MB"
    )
    for k in (1, concurrent):
        server.reset_peak()
        statuses, wall, texts = post_concurrently(server, headers, worst, k)
        peak = server.peak()
        rise = peak - baseline
        print(
            f"largest allowed request ({n} x {side}x{side} = {n * side * side} px, body {len(json.dumps(worst)) / MB:.1f} MB) "
            f"x {k} at once: HTTP {sorted(statuses)} in {wall:.1f} s; peak RSS {peak / MB:.0f} MB (+{rise / MB:.0f} MB "
            f"over rest) = {rise / budget_bytes:.2f} x the budget's RGB, {rise / bound:.2f} x decode_memory_bound, "
            f"{rise / (bound + scoring):.2f} x decode_memory_bound + scoring scratch"
        )
        if set(statuses) != {200}:
            print("   ", texts[0])

    refs = limits.max_references_per_image
    old_worst = body([big] * limits.max_images, refs, big)
    pixels = limits.max_images * (1 + refs) * side * side
    server.reset_peak()
    statuses, wall, texts = post_concurrently(server, headers, old_worst, 1)
    peak = server.peak()
    print(
        f"per-image limits only ({limits.max_images} images x (1 + {refs}) references of {side}x{side} = {pixels} px, "
        f"{pixels * 3 / 1e9:.1f} GB of RGB; body {len(json.dumps(old_worst)) / MB:.1f} MB): HTTP {statuses[0]} in {wall:.2f} s, "
        f"peak RSS {peak / MB:.0f} MB (+{(peak - baseline) / MB:.0f} MB over rest): {texts[0][:120]}"
    )
    return old_worst


def auth_phase(server: Server, headers: dict, big_body: dict) -> None:
    raw = httpx.Request("POST", f"{server.url}/v1/score", json=big_body).content
    host, port = server.url.removeprefix("http://").split(":")
    server.reset_peak()
    before = server.rss()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        start = time.perf_counter()
        sock.sendall(
            f"POST /v1/score HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
            + raw[:65536]
        )
        reply = sock.recv(4096)
        answered = time.perf_counter() - start
    print(
        f"unauthenticated request announcing {len(raw) / MB:.1f} MB (64 kB sent): {reply.split(b' ', 2)[1].decode()} after "
        f"{answered * 1e3:.1f} ms; server RSS +{(server.peak() - before) / MB:.0f} MB"
    )

    healthz: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not done.is_set():
                start = time.perf_counter()
                http.get("/healthz")
                healthz.append(time.perf_counter() - start)
                time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.2)
    start = time.perf_counter()
    status = httpx.post(f"{server.url}/v1/score", content=raw, headers={**headers, "content-type": "application/json"}, timeout=600).status_code
    sent = time.perf_counter() - start
    done.set()
    prober.join()
    print(
        f"/healthz while an authenticated {len(raw) / MB:.1f} MB body is sent and refused (HTTP {status} after {sent:.2f} s): "
        f"{len(healthz)} probes, p50 {percentile(healthz, 50) * 1e3:.1f} ms, max {max(healthz) * 1e3:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--batch", type=int, default=8, help="images per request in the load phase")
    parser.add_argument("--size", type=int, default=128, help="image side (px) in the load phase")
    parser.add_argument("--max-request-pixels", type=int, default=ServerConfig.max_request_pixels)
    parser.add_argument("--max-image-pixels", type=int, default=ServerConfig.max_image_pixels)
    parser.add_argument("--max-batches-in-flight", type=int, default=ServerConfig.max_batches_in_flight)
    parser.add_argument("--worst-concurrent", type=int, default=ServerConfig.max_batches_in_flight + 1)
    args = parser.parse_args()

    limits = ServerConfig(
        max_request_pixels=args.max_request_pixels,
        max_image_pixels=args.max_image_pixels,
        max_batches_in_flight=args.max_batches_in_flight,
    )
    overrides = [
        f"server.max_request_pixels={limits.max_request_pixels}",
        f"server.max_image_pixels={limits.max_image_pixels}",
        f"server.max_batches_in_flight={limits.max_batches_in_flight}",
    ]
    token = secrets.token_hex(16)
    headers = {"Authorization": f"Bearer {token}"}
    server = Server(overrides, token)
    try:
        print(f"server: {server.url} (pid {server.proc.pid}), quickstart reward (colour_target), {os.cpu_count()} CPUs")
        load_phase(server, headers, args.clients, args.requests, args.batch, args.size)
        old_worst = memory_phase(server, headers, limits, args.worst_concurrent)
        auth_phase(server, headers, old_worst)
    finally:
        server.close()


if __name__ == "__main__":
    main()
