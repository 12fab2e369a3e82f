"""The reward server: a FastAPI app over a RewardModel, run by uvicorn (scripts/reward_server.py) or as a
Ray Serve deployment with replicas per GPU.

Endpoints: ``GET /healthz``; ``GET /v1/info``; ``POST /v1/score`` with JSON
``{"images": [base64 PNG/JPEG], "prompts": [str], "references": [[{"image": base64, "kind": "face" |
"object", "caption": str}]]}`` -> ``{"rewards": [float], "components": {name: [float]}}``.

Order of the checks on ``POST /v1/score``, each answered before the next is paid for:

1. From the headers alone, before a byte of the body is read: 413 when Content-Length exceeds
   ``max_request_bytes``, 401 without the bearer token (when ``server.token_env`` names one; /healthz
   and /openapi.json stay open), 415 unless the content type is ``application/json``.
2. While the body streams in: 413 past ``max_request_bytes``. It is then parsed in a worker thread (the
   event loop, and /healthz, never wait on it), as JSON only, never unpickled: 400 if it is not UTF-8,
   422 if it is not JSON or not the schema.
3. From the image headers, before any pixel is decoded (PIL's ``Image.open`` reads only the header):
   413 past ``max_images``, ``max_references_per_image``, ``max_image_pixels`` (any image or reference
   whose header declares more) and ``max_request_pixels`` (the pixels all images and references of the
   request declare together); 422 for what is not a PNG or JPEG.
4. Decoding, one image at a time, at most ``max_batches_in_flight`` requests at once (one scored while
   the next decodes; the others wait holding only their body). References are decoded only when the
   reward reads their pixels (``rewards.types.reads_reference_images``: the ``id`` term); otherwise each
   is a zero-byte placeholder of its declared size, so counting them still works (subject_count).

Memory: decoding holds at most ``decode_memory_bound(limits)`` = max_batches_in_flight x (3 B x
max_request_pixels, the uint8 RGB arrays of a batch, + 11 B x max_image_pixels, the scratch of the one
image being decoded: PIL's decoded image, its RGB conversion and the array's buffer), 1.17 GB at the
defaults. On top of it: the bodies of the requests in flight (each <= max_request_bytes, about twice that
once read and parsed) and what the scorers allocate while scoring (colour_target: float32 copies of
one image at a time, 36 B x max_image_pixels). ``benchmarks/reward_server_load.py`` measures it.

Bad input (422): FastAPI's error format, ``{"detail": [{"loc": ["body", "images", 2], "msg": ...}]}``,
naming the field and index. The OpenAPI schema (/openapi.json) lists every status each endpoint answers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import re
import secrets
import socket
import threading
import time
from typing import Any, Iterator, Literal, Mapping, Sequence

import anyio.to_thread
import numpy as np
from anyio import CapacityLimiter
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from rewards.composite import build_reward, reward_info
from rewards.config import RewardConfig, ServerConfig
from rewards.types import InputError, ReferenceSubject, RewardModel, ScoreBatch, reads_reference_images


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


class ErrorOut(BaseModel):
    """401, 413, 415 and 400 bodies."""

    detail: str


class ValidationIssue(BaseModel):
    loc: list[str | int]  # ["body", "images", 2]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    """422 bodies: one issue per offending field, naming it and its index."""

    detail: list[ValidationIssue]


_UNAUTHORIZED = {
    "model": ErrorOut,
    "description": "Missing or wrong bearer token (only when the server requires one); answered from the "
    "headers, before the body is read",
    "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
}
SCORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "The body is not UTF-8 text"},
    401: _UNAUTHORIZED,
    413: {
        "model": ErrorOut,
        "content": {"text/plain": {"schema": {"type": "string"}}},  # Content-Length alone over the limit
        "description": "Over a limit (server.*, reported by /v1/info): max_request_bytes, max_images, "
        "max_references_per_image, max_image_pixels (any image's header) or max_request_pixels (all "
        "headers together); the detail names the limit",
    },
    415: {"model": ErrorOut, "description": "The content type is not application/json"},
    422: {"model": ValidationErrorOut, "description": "Bad input; each loc names the field and index"},
}
INFO_RESPONSES: dict[int | str, dict[str, Any]] = {401: _UNAUTHORIZED}
_SCORE_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}},
}


class PayloadTooLarge(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _invalid(loc: Sequence[str | int], message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": message, "type": "value_error"}])


def _where_to_loc(where: str) -> tuple[str | int, ...]:
    """ "references[1][0].image" -> ("references", 1, 0, "image")."""
    return tuple(int(index) if index else name for name, index in re.findall(r"(\w+)|\[(\d+)\]", where))


def _loc_text(loc: Sequence[str | int]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else (f".{part}" if i else part) for i, part in enumerate(loc))


# What decoding holds per pixel: the uint8 RGB array a batch keeps, and the scratch while one image decodes
# (PIL's decoded image, at most 4 B/px, its RGB conversion, 4 B/px, and the array's buffer, 3 B/px).
DECODED_BYTES_PER_PIXEL = 3
DECODE_SCRATCH_BYTES_PER_PIXEL = 11


def decode_memory_bound(limits: ServerConfig) -> int:
    """Bytes decoding may hold at once: max_batches_in_flight x (3 x max_request_pixels + 11 x
    max_image_pixels). Bodies and the scorers' own working memory come on top (see the module notes)."""
    per_batch = (
        DECODED_BYTES_PER_PIXEL * limits.max_request_pixels + DECODE_SCRATCH_BYTES_PER_PIXEL * limits.max_image_pixels
    )
    return limits.max_batches_in_flight * per_batch


def _base64(data: str, loc: Sequence[str | int]) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(loc, "not valid base64") from None


def _open_header(raw: bytes, loc: Sequence[str | int], max_pixels: int) -> Image.Image:
    """The PNG/JPEG in ``raw`` with only its header read: 422 naming ``loc`` if it is not one, 413 if the
    header declares more than ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(raw), formats=("PNG", "JPEG"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL refuses past 2 x Image.MAX_IMAGE_PIXELS before our own check could run (the warning, past
        # Image.MAX_IMAGE_PIXELS, raises only where warnings are errors): too large, not undecodable.
        raise PayloadTooLarge(
            f"{_loc_text(loc)}: the header declares more than {Image.MAX_IMAGE_PIXELS} pixels, over "
            f"max_image_pixels={max_pixels}"
        ) from None
    except (OSError, ValueError, SyntaxError):
        raise _invalid(loc, "not a decodable PNG or JPEG image") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise PayloadTooLarge(f"{_loc_text(loc)}: {width}x{height} image exceeds max_image_pixels={max_pixels}")
    return image


def image_size(data: str, loc: Sequence[str | int], max_pixels: int) -> tuple[int, int]:
    """(width, height) of base64 PNG/JPEG ``data`` from its header; no pixel is decoded. 422 naming ``loc``
    if it is not one, 413 if it declares more than ``max_pixels``."""
    with _open_header(_base64(data, loc), loc, max_pixels) as image:
        return image.size


def decode_image(data: str, loc: Sequence[str | int], max_pixels: int) -> np.ndarray:
    """base64 PNG/JPEG -> (H, W, 3) uint8 RGB; 422 naming ``loc`` if undecodable, 413 if too many pixels.
    The size is read from the header before any pixel is decoded."""
    image = _open_header(_base64(data, loc), loc, max_pixels)
    try:
        with image:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            try:
                return np.asarray(rgb, dtype=np.uint8)
            finally:
                if rgb is not image:
                    rgb.close()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _invalid(loc, "not a decodable PNG or JPEG image") from None


_ZERO_PIXEL = np.zeros((1, 1, 3), dtype=np.uint8)
_ZERO_PIXEL.flags.writeable = False


def _placeholder(width: int, height: int) -> np.ndarray:
    """A read-only (height, width, 3) array of zeros that holds 3 bytes: a reference the reward never looks
    at keeps its declared size without being decoded."""
    return np.broadcast_to(_ZERO_PIXEL, (height, width, 3))


def check_request(request: ScoreRequest, limits: ServerConfig) -> list[list[tuple[int, int]]]:
    """Check counts, lengths and every image header against the limits before any pixel is decoded (413
    over a limit, 422 for bad input); returns the (width, height) of each reference."""
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
    total = 0
    for i, data in enumerate(request.images):
        width, height = image_size(data, ("images", i), limits.max_image_pixels)
        total += width * height
    reference_sizes = []
    for i, subjects in enumerate(request.references):
        sizes = [image_size(ref.image, ("references", i, j, "image"), limits.max_image_pixels) for j, ref in enumerate(subjects)]
        total += sum(width * height for width, height in sizes)
        reference_sizes.append(sizes)
    if total > limits.max_request_pixels:
        raise PayloadTooLarge(
            f"images and references: their headers declare {total} pixels in all, over "
            f"max_request_pixels={limits.max_request_pixels}"
        )
    return reference_sizes


def decode_batch(
    request: ScoreRequest,
    reference_sizes: Sequence[Sequence[tuple[int, int]]],
    limits: ServerConfig,
    decode_references: bool = True,
) -> ScoreBatch:
    """Decode a request ``check_request`` passed, one image at a time, into the typed batch. With
    ``decode_references=False`` each reference is a zero-byte placeholder of its declared size."""
    images = [decode_image(data, ("images", i), limits.max_image_pixels) for i, data in enumerate(request.images)]
    references = [
        [
            ReferenceSubject(
                image=(
                    decode_image(ref.image, ("references", i, j, "image"), limits.max_image_pixels)
                    if decode_references
                    else _placeholder(*reference_sizes[i][j])
                ),
                kind=ref.kind,
                caption=ref.caption,
            )
            for j, ref in enumerate(subjects)
        ]
        for i, subjects in enumerate(request.references)
    ]
    return ScoreBatch(images=images, prompts=list(request.prompts), references=references)


def parse_request(body: bytes) -> ScoreRequest:
    """JSON bytes -> the validated request (JSON only, never unpickled): 400 if not UTF-8, 422 naming
    each offending field otherwise."""
    try:
        return ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(error["type"] == "json_invalid" for error in errors):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise HTTPException(status_code=400, detail="the body is not UTF-8 JSON") from None
        raise RequestValidationError(
            [{"loc": ("body", *error["loc"]), "msg": error["msg"], "type": error["type"]} for error in errors]
        ) from None


def parse_and_check(body: bytes, limits: ServerConfig) -> tuple[ScoreRequest, list[list[tuple[int, int]]]]:
    """``parse_request`` then ``check_request``: everything before any pixel is decoded."""
    request = parse_request(body)
    return request, check_request(request, limits)


def request_to_batch(request: ScoreRequest, limits: ServerConfig, decode_references: bool = True) -> ScoreBatch:
    """Check limits and lengths from the headers, then decode: the typed batch."""
    return decode_batch(request, check_request(request, limits), limits, decode_references)


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _unsupported_media_type(headers: Headers) -> bool:
    """A body that is not declared application/json (no body and no type: left to the 422 for the missing body)."""
    content_type = headers.get("content-type")
    if content_type is None:
        return headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers
    return content_type.split(";", 1)[0].strip().lower() != "application/json"


class _HeaderGuard:
    """Pure ASGI middleware: answers 401 (bearer token) and 415 (content type) on /v1/* from the request
    headers, before a byte of the body is read (an unauthenticated 50 MB body costs nothing)."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = None if token is None else token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = _route_path(scope)
            if path.startswith("/v1/"):
                headers = Headers(scope=scope)
                response = None
                if self.token is not None:
                    scheme, _, given = headers.get("authorization", "").partition(" ")
                    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.token):
                        response = JSONResponse(
                            status_code=401,
                            content={"detail": "missing or wrong bearer token"},
                            headers={"WWW-Authenticate": "Bearer"},
                        )
                if response is None and scope["method"] == "POST" and path == "/v1/score":
                    if _unsupported_media_type(headers):
                        content_type = headers.get("content-type")
                        response = JSONResponse(
                            status_code=415,
                            content={"detail": f"POST /v1/score takes application/json, got content type {content_type!r}"},
                        )
                if response is not None:
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _check_weights(reward: RewardModel) -> None:
    weights = getattr(reward, "weights", None)
    if isinstance(weights, Mapping):
        bad = [f"weights.{name}={value!r}" for name, value in weights.items() if not math.isfinite(value)]
        if bad:
            raise ValueError(f"reward weights must be finite numbers, got {', '.join(bad)}")


def create_app(reward: RewardModel, limits: ServerConfig, info: dict, token: str | None = None) -> FastAPI:
    """The FastAPI app serving ``reward``. ``token``: the bearer token /v1/* requires (None: no auth)."""
    _check_weights(reward)
    # max_body_size: FastAPI answers 413 from Content-Length, or while the body streams in, before parsing.
    app = FastAPI(title="rl-align reward server", version="1", max_body_size=limits.max_request_bytes)
    app.add_middleware(_HeaderGuard, token=token)  # 401 and 415 before the body is read
    # Documents the bearer scheme in the OpenAPI schema; _HeaderGuard has already checked the token.
    security = [Depends(HTTPBearer(auto_error=False))] if token is not None else []
    decode_references = reads_reference_images(reward)
    # At most max_batches_in_flight requests decode or score at once (the memory bound); one batch at a
    # time through the models: they are not thread-safe, and batching inside one call is where the
    # throughput is.
    batch_slots = CapacityLimiter(limits.max_batches_in_flight)
    model_lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each offending "input", which for a base64 image is megabytes.
        detail = [{"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]} for error in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(PayloadTooLarge)
    async def too_large(_: Request, exc: PayloadTooLarge) -> JSONResponse:
        return JSONResponse(status_code=413, content={"detail": exc.message})

    @app.exception_handler(InputError)
    async def bad_input(_: Request, exc: InputError) -> JSONResponse:
        detail = [{"loc": ["body", *_where_to_loc(exc.where)], "msg": exc.problem, "type": "value_error"}]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.get("/healthz")
    async def healthz() -> dict:  # on the event loop: answers while workers decode or score
        return {"status": "ok"}

    @app.get("/v1/info", dependencies=security, responses=INFO_RESPONSES)
    async def v1_info() -> dict:
        return {
            **info,
            "reads_reference_images": decode_references,
            "limits": {
                "max_images": limits.max_images,
                "max_request_bytes": limits.max_request_bytes,
                "max_references_per_image": limits.max_references_per_image,
                "max_image_pixels": limits.max_image_pixels,
                "max_request_pixels": limits.max_request_pixels,
                "max_batches_in_flight": limits.max_batches_in_flight,
            },
        }

    def decode_and_score(request: ScoreRequest, reference_sizes: list[list[tuple[int, int]]]) -> ScoreResponse:
        batch = decode_batch(request, reference_sizes, limits, decode_references)
        with model_lock:
            result = reward.score(batch)
        return ScoreResponse(
            rewards=result.rewards.tolist(), components={k: v.tolist() for k, v in result.components.items()}
        )

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        dependencies=security,
        responses=SCORE_RESPONSES,
        openapi_extra={"requestBody": _SCORE_REQUEST_BODY},
    )
    async def v1_score(http_request: Request) -> ScoreResponse:
        try:
            body = await http_request.body()  # streams in on the event loop, within max_request_bytes
        except ClientDisconnect:  # nobody left to answer; not a server error
            raise HTTPException(status_code=400, detail="the client disconnected before sending the whole body") from None
        # Parsed and checked in a worker: a 60 MB body takes ~0.3 s to parse, which would stall /healthz.
        request, reference_sizes = await run_in_threadpool(parse_and_check, body, limits)
        del body
        return await anyio.to_thread.run_sync(decode_and_score, request, reference_sizes, limiter=batch_slots)

    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # The body is parsed by hand (off the event loop), so its schema is added here.
        if app.openapi_schema is None:
            schema = build_openapi()
            body_schema = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(body_schema.pop("$defs", {}))
            schemas["ScoreRequest"] = body_schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
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
