"""Client of the reward server: same ``score(batch) -> RewardResult`` as the in-process reward, plus
``submit(batch)`` returning a Future so a trainer can score one batch while it samples the next.

Requests carry images as base64 JSON: PNG by default (lossless, so the server scores exactly the pixels
an in-process reward would), or JPEG at quality 95 (several times faster to encode at 512 px, slightly
lossy). Connection errors, timeouts, 429 and 5xx answers are retried with exponential backoff (with
jitter, so many trainers do not retry in lockstep) within a retry budget (``RetryPolicy``: attempts and a
total deadline), each failed attempt logged as a warning, so a server restart within the budget is
ridden out; any other 4xx is the caller's mistake and raises at once with the server's message.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import httpx
import numpy as np
from PIL import Image

from rewards.types import RewardResult, ScoreBatch

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
log = logging.getLogger("rewards.client")


class RewardServerError(RuntimeError):
    """The server refused the request (4xx), or every retry failed."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


ImageFormat = Literal["png", "jpeg"]


def encode_image_base64(image: np.ndarray, image_format: ImageFormat = "png") -> str:
    """(H, W, 3) uint8 -> base64 PNG (compress_level 1: encoding time matters more than bytes on a
    cluster network) or JPEG (quality 95)."""
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def batch_to_json(batch: ScoreBatch, image_format: ImageFormat = "png") -> dict:
    """The /v1/score request body for a batch."""
    encode = lambda image: encode_image_base64(image, image_format)  # noqa: E731
    return {
        "images": [encode(image) for image in batch.images],
        "prompts": list(batch.prompts),
        "references": [
            [{"image": encode(s.image), "kind": s.kind, "caption": s.caption} for s in subjects]
            for subjects in batch.references
        ],
    }


@dataclass(frozen=True)
class RetryPolicy:
    """The retry budget of one request: at most ``attempts`` tries, and no retry that would start after
    ``deadline_s`` seconds from the first try (the waits between tries count, the request timeouts too)."""

    attempts: int = 4  # total tries
    backoff_s: float = 0.5  # first wait; doubles each retry
    max_backoff_s: float = 8.0
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"backoffs must be >= 0, got {self.backoff_s} and {self.max_backoff_s}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")

    def delay(self, retry: int) -> float:
        """Wait before retry number ``retry`` (0-based): min(backoff 2^retry, max) scaled by U(0.5, 1)."""
        return min(self.backoff_s * 2**retry, self.max_backoff_s) * random.uniform(0.5, 1.0)


class RewardClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        retry: RetryPolicy = RetryPolicy(),
        image_format: ImageFormat = "png",
    ):
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
        self.image_format = image_format
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retry = retry
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s)
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-client")

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        started = time.monotonic()
        where = f"{method} {self._http.base_url}{path}"
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in RETRYABLE_STATUS:
                    raise RewardServerError(f"{where} -> HTTP {response.status_code}: {response.text[:2000]}", response.status_code)
                last_error = f"HTTP {response.status_code}: {response.text[:500]}"
            elapsed = time.monotonic() - started
            wait = self.retry.delay(attempt - 1)
            if attempt == self.retry.attempts or elapsed + wait > self.retry.deadline_s:
                break
            log.warning("%s: attempt %d of %d failed after %.1f s (%s); retrying in %.1f s", where, attempt, self.retry.attempts, elapsed, last_error, wait)
            time.sleep(wait)
        raise RewardServerError(
            f"{where} failed after {attempt} attempts in {time.monotonic() - started:.1f} s, the end of its retry budget "
            f"(attempts {self.retry.attempts}, deadline {self.retry.deadline_s:g} s); last error: {last_error}"
        )

    def score(self, batch: ScoreBatch) -> RewardResult:
        data = self._request("POST", "/v1/score", batch_to_json(batch, self.image_format))
        return RewardResult(
            rewards=np.asarray(data["rewards"], dtype=np.float64),
            components={name: np.asarray(values, dtype=np.float64) for name, values in data["components"].items()},
        )

    def submit(self, batch: ScoreBatch) -> Future[RewardResult]:
        """Score in a background thread; ``.result()`` gives the RewardResult (or raises its error). From
        asyncio code: ``await asyncio.wrap_future(client.submit(batch))``."""
        return self._pool.submit(self.score, batch)

    def info(self) -> dict:
        return self._request("GET", "/v1/info")

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
