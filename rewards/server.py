"""The reward server: a FastAPI app over a RewardModel, run by uvicorn (scripts/reward_server.py) or as a
Ray Serve deployment with replicas per GPU.

Endpoints: ``GET /healthz``; ``GET /v1/info``; ``POST /v1/score`` with JSON
``{"images": [base64 PNG/JPEG], "prompts": [str], "references": [[{"image": base64, "kind": "face" |
"object", "caption": str}]]}`` -> ``{"rewards": [float], "components": {name: [float]}}``.

Request bodies are JSON only and never unpickled. Limits (413): body bytes (checked while the body
streams in, before parsing), images per request, references per image, decoded pixels per image. Bad
input (422): FastAPI's error format, ``{"detail": [{"loc": ["body", "images", 2], "msg": ...}]}``, naming
the field and index. An optional bearer token guards /v1/* (401); /healthz stays open for probes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import secrets
import socket
import threading
import time
import warnings
from typing import Iterator, Literal, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict

from rewards.composite import build_reward, reward_info
from rewards.config import RewardConfig, ServerConfig
from rewards.types import InputError, ReferenceSubject, RewardModel, ScoreBatch


class ReferenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str  # base64 PNG or JPEG
    kind: Literal["face", "object"]
    caption: str = ""


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str]  # base64 PNG or JPEG, one per generated image
    prompts: list[str]
    references: list[list[ReferenceIn]]  # per image (an empty list for none)


class ScoreResponse(BaseModel):
    rewards: list[float]
    components: dict[str, list[float]]


class PayloadTooLarge(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _invalid(loc: Sequence[str | int], message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": "value_error"}])


def _where_to_loc(where: str) -> tuple[str | int, ...]:
    """ "references[1][0].image" -> ("references", 1, 0, "image")."""
    return tuple(int(index) if index else name for name, index in re.findall(r"(\w+)|\[(\d+)\]", where))


def decode_image(data: str, loc: Sequence[str | int], max_pixels: int) -> np.ndarray:
    """base64 PNG/JPEG -> (H, W, 3) uint8 RGB; 422 naming ``loc`` if undecodable, 413 if too many pixels.
    The size is read from the header before any pixel is decoded."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(loc, "not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(f"{_loc_text(loc)}: {width}x{height} image exceeds max_image_pixels={max_pixels}")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except PayloadTooLarge:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _invalid(loc, "not a decodable PNG or JPEG image") from None


def _loc_text(loc: Sequence[str | int]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else (f".{part}" if i else part) for i, part in enumerate(loc))


def request_to_batch(request: ScoreRequest, limits: ServerConfig) -> ScoreBatch:
    """Check limits and lengths, decode every image, build the typed batch."""
    n = len(request.images)
    if n > limits.max_images:
        raise PayloadTooLarge(f"images: {n} images exceed max_images={limits.max_images}")
    most = limits.max_references_per_image
    for i, subjects in enumerate(request.references):
        if len(subjects) > most:
            raise PayloadTooLarge(f"references[{i}]: {len(subjects)} references exceed max_references_per_image={most}")
    if len(request.prompts) != n:
        raise _invalid(("prompts",), f"expected {n} prompts (one per image), got {len(request.prompts)}")
    if len(request.references) != n:
        raise _invalid(("references",), f"expected {n} reference lists (one per image), got {len(request.references)}")
    images = [decode_image(data, ("images", i), limits.max_image_pixels) for i, data in enumerate(request.images)]
    references = [
        [
            ReferenceSubject(
                image=decode_image(ref.image, ("references", i, j, "image"), limits.max_image_pixels),
                kind=ref.kind,
                caption=ref.caption,
            )
            for j, ref in enumerate(subjects)
        ]
        for i, subjects in enumerate(request.references)
    ]
    return ScoreBatch(images=images, prompts=list(request.prompts), references=references)


class _Unauthorized(Exception):
    pass


def create_app(reward: RewardModel, limits: ServerConfig, info: dict, token: str | None = None) -> FastAPI:
    """The FastAPI app serving ``reward``. ``token``: the bearer token /v1/* requires (None: no auth)."""
    # max_body_size: FastAPI answers 413 from Content-Length, or while the body streams in, before parsing.
    app = FastAPI(title="rl-align reward server", version="1", max_body_size=limits.max_request_bytes)
    # One batch at a time through the models: they are not thread-safe, and batching inside one call is
    # where the throughput is.
    model_lock = threading.Lock()

    def check_token(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.encode()):
            raise _Unauthorized()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each offending "input", which for a base64 image is megabytes.
        detail = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(PayloadTooLarge)
    async def too_large(_: Request, exc: PayloadTooLarge) -> JSONResponse:
        return JSONResponse(status_code=413, content={"detail": exc.message})

    @app.exception_handler(_Unauthorized)
    async def unauthorized(_: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse(
            status_code=401, content={"detail": "missing or wrong bearer token"}, headers={"WWW-Authenticate": "Bearer"}
        )

    @app.exception_handler(InputError)
    async def bad_input(_: Request, exc: InputError) -> JSONResponse:
        detail = [{"loc": ["body", *_where_to_loc(exc.where)], "msg": exc.problem, "type": "value_error"}]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", dependencies=[Depends(check_token)])
    def v1_info() -> dict:
        return {
            **info,
            "limits": {
                "max_images": limits.max_images,
                "max_request_bytes": limits.max_request_bytes,
                "max_references_per_image": limits.max_references_per_image,
                "max_image_pixels": limits.max_image_pixels,
            },
        }

    @app.post("/v1/score", response_model=ScoreResponse, dependencies=[Depends(check_token)])
    async def v1_score(request: ScoreRequest) -> ScoreResponse:
        batch = await run_in_threadpool(request_to_batch, request, limits)

        def run() -> ScoreResponse:
            with model_lock:
                result = reward.score(batch)
            return ScoreResponse(
                rewards=result.rewards.tolist(), components={k: v.tolist() for k, v in result.components.items()}
            )

        return await run_in_threadpool(run)

    return app


def server_token(limits: ServerConfig, environ: dict[str, str]) -> str | None:
    """The bearer token from the environment variable ``limits.token_env`` (None when no variable is named)."""
    if not limits.token_env:
        return None
    token = environ.get(limits.token_env, "")
    if not token:
        raise ValueError(
            f"server.token_env names {limits.token_env!r}, but that environment variable is empty or unset"
        )
    return token


def build_app(cfg: RewardConfig, environ: dict[str, str]) -> FastAPI:
    """Load the reward of ``cfg`` and serve it (what both uvicorn and each Ray Serve replica run)."""
    token = server_token(cfg.server, environ)
    return create_app(build_reward(cfg), cfg.server, reward_info(cfg), token)


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread; yields its base URL. ``port=0`` lets the OS pick a
    free port (the socket is bound here, so the URL is known before the server starts)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="reward-server")
    thread.start()
    try:
        deadline = time.monotonic() + 30.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the reward server did not start")
            time.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30.0)
        sock.close()
