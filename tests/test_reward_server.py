"""The reward server under a real uvicorn on 127.0.0.1 (OS-assigned port), and its client."""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rewards import (
    ReferenceSubject,
    RewardConfig,
    ScoreBatch,
    build_reward,
    reward_info,
)
from rewards.client import (
    RetryPolicy,
    RewardClient,
    RewardServerError,
    batch_to_json,
    encode_image_base64,
)
from rewards.composite import CompositeReward
from rewards.config import ColourTargetConfig, FaceConfig, JpegConfig, ServerConfig, ShapesConfig, WeightsConfig
from rewards.faces import DlibFaceEmbedder
from rewards.identity import IdentityScorer
from rewards.server import build_app, create_app, running_server, server_token
from rewards.shapes import SubjectCountScorer
from rewards.types import reads_reference_images
from rewards.weight_free import ColourTargetScorer, JpegSizeScorer
from rl_align.core.config import load_config

TOKEN = "test-token-123"
LIMITS = ServerConfig(max_images=4, max_request_bytes=200_000, max_references_per_image=2, max_image_pixels=128 * 128)


def _reward() -> CompositeReward:
    # Weight-free components plus a real dlib ``id`` scorer (loaded from the face-recognition-models
    # package), so that scorer-side input errors are exercised too.
    return CompositeReward(
        [
            ColourTargetScorer(ColourTargetConfig()),
            JpegSizeScorer("jpeg_compressibility", -1.0, JpegConfig()),
            IdentityScorer([DlibFaceEmbedder(FaceConfig())]),
        ],
        {"colour_target": 1.0, "jpeg_compressibility": 0.1, "id": 0.5},
    )


@pytest.fixture(scope="module")
def reward():
    return _reward()


@pytest.fixture(scope="module")
def server_url(reward):
    app = create_app(reward, LIMITS, {"weights": reward.weights}, token=TOKEN)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def http(server_url):
    with httpx.Client(base_url=server_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        yield client


def _batch(n=2, seed=0, size=32):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]
    return ScoreBatch(images=images, prompts=[f"prompt {i}" for i in range(n)], references=[[] for _ in range(n)])


def _valid_body(n=2):
    return batch_to_json(_batch(n))


def test_health_info_and_a_valid_request_match_in_process(http, reward):
    assert http.get("/healthz").json() == {"status": "ok"}
    info = http.get("/v1/info").json()
    assert info["weights"] == reward.weights and info["limits"]["max_images"] == 4
    assert info["limits"]["max_request_pixels"] == LIMITS.max_request_pixels and info["reads_reference_images"]
    batch = _batch(3)
    response = http.post("/v1/score", json=batch_to_json(batch))
    assert response.status_code == 200, response.text
    data = response.json()
    expected = reward.score(batch)  # PNG is lossless: the server sees the same pixels
    np.testing.assert_allclose(data["rewards"], expected.rewards, rtol=1e-12)
    assert set(data["components"]) == {"colour_target", "jpeg_compressibility", "id"}
    np.testing.assert_allclose(data["components"]["id"], [0.0, 0.0, 0.0])


def _replace(body, path, value):
    body = {k: list(v) if isinstance(v, list) else v for k, v in body.items()}
    if len(path) == 1:
        if value is _DELETE:
            del body[path[0]]
        else:
            body[path[0]] = value
    else:
        body[path[0]][path[1]] = value
    return body


_DELETE = object()
_NOT_AN_IMAGE = base64.b64encode(b"GIF89a not an image").decode()
_FACE_REF = {"image": encode_image_base64(np.zeros((16, 16, 3), np.uint8)), "kind": "face", "caption": ""}


@pytest.mark.parametrize(
    "path, value, loc",
    [
        (("prompts",), _DELETE, ["body", "prompts"]),
        (("references",), _DELETE, ["body", "references"]),
        (("images",), _DELETE, ["body", "images"]),
        (("images", 1), _NOT_AN_IMAGE, ["body", "images", 1]),
        (("images", 1), "%%% not base64 %%%", ["body", "images", 1]),
        (("images", 0), 7, ["body", "images", 0]),
        (("prompts",), ["only one"], ["body", "prompts"]),
        (("references",), [[]], ["body", "references"]),
        (("references", 1), [{**_FACE_REF, "image": _NOT_AN_IMAGE}], ["body", "references", 1, 0, "image"]),
        (("references", 0), [{**_FACE_REF, "kind": "animal"}], ["body", "references", 0, 0, "kind"]),
        (("references", 0), [{"kind": "face"}], ["body", "references", 0, 0, "image"]),
        # Decodes fine but shows no face: the scorer's error names the reference.
        (("references", 1), [_FACE_REF], ["body", "references", 1, 0, "image"]),
    ],
)
def test_bad_input_is_422_naming_field_and_index(http, path, value, loc):
    response = http.post("/v1/score", json=_replace(_valid_body(), path, value))
    assert response.status_code == 422, response.text
    assert loc in [error["loc"] for error in response.json()["detail"]], response.text


def test_non_json_bodies_are_client_errors(http):
    # Bodies are parsed as JSON only: a pickle (or any non-UTF-8 bytes) is refused, never loaded.
    response = http.post("/v1/score", content=b"\x80\x04\x95 pickle", headers={"content-type": "application/json"})
    assert response.status_code == 400
    for text in (b"{not json", b'{"images": [NaN], "prompts": [Infinity], "references": [[]]}'):
        response = http.post("/v1/score", content=text, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text


def test_bearer_token(server_url):
    body = _valid_body(1)
    assert httpx.post(f"{server_url}/v1/score", json=body).status_code == 401
    wrong = httpx.post(f"{server_url}/v1/score", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server_url}/v1/info").status_code == 401
    assert httpx.get(f"{server_url}/healthz").status_code == 200  # probes need no token
    right = httpx.post(f"{server_url}/v1/score", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200


def test_limits_are_413(http):
    assert http.post("/v1/score", json=_valid_body(5)).status_code == 413  # max_images=4
    too_many_refs = _replace(_valid_body(1), ("references", 0), [_FACE_REF] * 3)
    assert http.post("/v1/score", json=too_many_refs).status_code == 413
    big = np.zeros((200, 100, 3), np.uint8)  # 20000 px > 128 * 128, but a small PNG
    response = http.post("/v1/score", json=_replace(_valid_body(1), ("images", 0), encode_image_base64(big)))
    assert response.status_code == 413 and "images[0]" in response.json()["detail"]
    rng = np.random.default_rng(0)
    noisy = encode_image_base64(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8))  # ~58 kB each
    assert (
        http.post("/v1/score", json={"images": [noisy] * 4, "prompts": [""] * 4, "references": [[]] * 4}).status_code
        == 413
    )

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(50):
            yield b" " * 10_000

    assert http.post("/v1/score", content=chunks(), headers={"content-type": "application/json"}).status_code == 413


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20)
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_image_text = st.one_of(
    st.just(_valid_body(1)["images"][0]),
    st.just(_NOT_AN_IMAGE),
    st.text(max_size=30),
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
)
_reference = (
    st.fixed_dictionaries(
        {"image": _image_text, "kind": st.sampled_from(["face", "object", "x"]), "caption": st.text(max_size=10)}
    )
    | _json
)
_near_valid = st.fixed_dictionaries(
    {
        "images": st.lists(_image_text | _json_leaf, max_size=5),
        "prompts": st.lists(st.text(max_size=10) | _json_leaf, max_size=5),
        "references": st.lists(st.lists(_reference, max_size=3) | _json_leaf, max_size=5),
    }
)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same 300 bodies on every run
    database=None,  # nothing written to .hypothesis/examples
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.one_of(_json, _near_valid))
def test_fuzzed_json_bodies_never_get_a_5xx(http, body):
    response = http.post("/v1/score", json=body)
    assert response.status_code < 500, (body, response.text)
    assert response.status_code in (200, 413, 422), response.text


def test_client_scores_submits_and_reports_errors(server_url, reward):
    batch = _batch(2, seed=3)
    with RewardClient(server_url, token=TOKEN, timeout_s=30) as client:
        assert client.healthy()
        result = client.score(batch)
        np.testing.assert_allclose(result.rewards, reward.score(batch).rewards, rtol=1e-12)
        futures = [client.submit(_batch(2, seed=s)) for s in range(3)]
        for seed, future in enumerate(futures):
            np.testing.assert_allclose(
                future.result(timeout=60).rewards, reward.score(_batch(2, seed=seed)).rewards, rtol=1e-12
            )
        bad = ScoreBatch(
            images=batch.images,
            prompts=batch.prompts,
            references=[[ReferenceSubject(np.zeros((16, 16, 3), np.uint8), "face")], []],
        )
        with pytest.raises(RewardServerError, match="no face detected") as info:
            client.score(bad)
        assert info.value.status_code == 422
    with RewardClient(server_url, token=TOKEN, image_format="jpeg") as client:
        ramp = np.broadcast_to(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], (32, 32, 3)).copy()
        smooth = ScoreBatch(images=[ramp, 255 - ramp], prompts=["", ""])
        lossy = client.score(smooth)  # JPEG on a smooth image: close to, not exactly, the in-process reward
        exact = reward.score(smooth).components["colour_target"]
        np.testing.assert_allclose(lossy.components["colour_target"], exact, atol=0.01)
    with RewardClient(server_url, token="wrong") as client, pytest.raises(RewardServerError) as info:
        client.info()
    assert info.value.status_code == 401


def test_client_retries_with_backoff_then_gives_up():
    # A server that fails twice with 503 before answering: the client must retry through it.
    calls = []
    flaky = FastAPI()

    @flaky.get("/v1/info")
    def info():
        calls.append(time.monotonic())
        if len(calls) <= 2:
            return JSONResponse(status_code=503, content={"detail": "warming up"})
        return {"ok": True}

    refused = []

    @flaky.post("/v1/score")
    def score():
        refused.append(1)
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", "images", 0], "msg": "bad"}]})

    with running_server(flaky) as url, RewardClient(url, retry=RetryPolicy(attempts=3, backoff_s=0.05)) as client:
        assert client.info() == {"ok": True}
        with pytest.raises(RewardServerError, match="HTTP 422"):
            client.score(_batch(1))
    assert len(refused) == 1  # the caller's mistake: never retried
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.025 and calls[2] - calls[1] >= 0.05  # waits of U(0.5, 1) x 0.05, x 0.1

    with running_server(flaky) as url:
        pass  # the port is closed again: nothing listens there now
    with RewardClient(url, retry=RetryPolicy(attempts=2, backoff_s=0.05), connect_timeout_s=1.0) as client:
        with pytest.raises(RewardServerError, match="failed after 2 attempts"):
            client.info()


def test_token_comes_from_the_named_environment_variable():
    assert server_token(ServerConfig(), {}) is None
    assert server_token(ServerConfig(token_env="RT"), {"RT": "abc"}) == "abc"
    with pytest.raises(ValueError, match="'RT'.*empty or unset"):
        server_token(ServerConfig(token_env="RT"), {})


def test_the_app_serves_the_quickstart_config():
    cfg = load_config(RewardConfig, Path(__file__).resolve().parent.parent / "configs" / "rewards" / "quickstart.yaml")
    with running_server(build_app(cfg, {})) as url, RewardClient(url) as client:
        batch = _batch(2)
        np.testing.assert_allclose(client.score(batch).rewards, build_reward(cfg).score(batch).rewards)
        assert client.info()["weights"] == reward_info(cfg)["weights"]


# --- The request-wide pixel budget, reference decoding, bounded decoding, auth before the body, 415, the
# OpenAPI statuses and non-finite weights (each of these tests fails on the server before them).


def _colour_reward(*extra) -> CompositeReward:
    scorers = [ColourTargetScorer(ColourTargetConfig()), *extra]
    return CompositeReward(scorers, {scorer.name: 1.0 for scorer in scorers})


def _count_decodes(monkeypatch, delay_s: float = 0.0) -> dict:
    """Wrap rewards.server.decode_image (the one function that decodes pixels): the locs it decoded and
    the most decodes that ran at once."""
    import rewards.server as server_module

    original = server_module.decode_image
    seen = {"locs": [], "active": 0, "most_at_once": 0}
    lock = threading.Lock()

    def counting(data, loc, max_pixels):
        with lock:
            seen["locs"].append(tuple(loc))
            seen["active"] += 1
            seen["most_at_once"] = max(seen["most_at_once"], seen["active"])
        try:
            time.sleep(delay_s)
            return original(data, loc, max_pixels)
        finally:
            with lock:
                seen["active"] -= 1

    monkeypatch.setattr(server_module, "decode_image", counting)
    return seen


def _with_references(body: dict, per_image: int, size: int = 64) -> dict:
    ref = {"image": encode_image_base64(np.full((size, size, 3), 200, np.uint8)), "kind": "object", "caption": "a"}
    return {**body, "references": [[ref] * per_image for _ in body["images"]]}


def test_a_request_over_the_pixel_budget_is_413_before_any_image_is_decoded(monkeypatch):
    limits = dataclasses.replace(LIMITS, max_image_pixels=64 * 64, max_request_pixels=3 * 64 * 64)  # three 64 x 64 images
    seen = _count_decodes(monkeypatch)
    with running_server(create_app(_colour_reward(), limits, {})) as url:
        over = httpx.post(f"{url}/v1/score", json=batch_to_json(_batch(4, size=64)), timeout=30)
        assert over.status_code == 413, over.text
        assert "max_request_pixels=12288" in over.json()["detail"] and "16384" in over.json()["detail"]
        # References count too, even for a reward that never decodes them: 2 images + 2 references.
        refs = httpx.post(f"{url}/v1/score", json=_with_references(batch_to_json(_batch(2, size=64)), 1), timeout=30)
        assert refs.status_code == 413 and "max_request_pixels" in refs.json()["detail"], refs.text
        assert seen["locs"] == []  # nothing decoded for either
        within = httpx.post(f"{url}/v1/score", json=batch_to_json(_batch(3, size=64)), timeout=30)
        assert within.status_code == 200, within.text
        assert seen["locs"] == [("images", 0), ("images", 1), ("images", 2)]


def test_references_are_decoded_only_for_a_reward_that_reads_them(monkeypatch, http):
    batch = _batch(2, size=32)
    body = _with_references(batch_to_json(batch), 2, size=48)
    refs = [[ReferenceSubject(np.full((48, 48, 3), 200, np.uint8), "object", "a")] * 2 for _ in range(2)]
    # colour_target reads no reference; subject_count counts them but reads no pixel.
    reward = _colour_reward(SubjectCountScorer(ShapesConfig()))
    assert not reads_reference_images(reward)
    seen = _count_decodes(monkeypatch)
    with running_server(create_app(reward, LIMITS, {})) as url:
        response = httpx.post(f"{url}/v1/score", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert seen["locs"] == [("images", 0), ("images", 1)]
    expected = reward.score(ScoreBatch(batch.images, batch.prompts, refs))  # with the decoded references
    np.testing.assert_allclose(response.json()["rewards"], expected.rewards, rtol=1e-12)
    # The module's server scores ``id``, which embeds references: there they are decoded.
    seen["locs"].clear()
    http.post("/v1/score", json=body)  # 422 (no face in the references), after decoding them
    assert ("references", 0, 0, "image") in seen["locs"] and ("references", 1, 1, "image") in seen["locs"]


def test_reads_reference_images_is_declared_not_guessed():
    assert reads_reference_images(_reward())  # the id term
    assert not reads_reference_images(_colour_reward(JpegSizeScorer("jpeg_compressibility", -1.0, JpegConfig())))

    class Custom:
        name = "custom"

        def score(self, batch):
            return np.zeros(len(batch))

    assert reads_reference_images(Custom())  # undeclared: taken to read them (its references are decoded)
    Custom.reads_reference_images = False
    assert not reads_reference_images(CompositeReward([Custom()], {"custom": 1.0}))
    from rewards.clip_scores import ClipTextScorer, HpsScorer
    from rewards.shapes import BackgroundScorer, SubjectCountScorer
    from rewards.weight_free import ColourTargetScorer

    builtin = (IdentityScorer, ClipTextScorer, HpsScorer, SubjectCountScorer, BackgroundScorer, ColourTargetScorer, JpegSizeScorer)
    assert all(isinstance(getattr(cls, "reads_reference_images", None), bool) for cls in builtin)  # each declares it
    assert {cls.__name__ for cls in builtin if cls.reads_reference_images} == {"IdentityScorer"}


def test_decoding_is_bounded_by_max_batches_in_flight(monkeypatch):
    limits = dataclasses.replace(LIMITS, max_batches_in_flight=1)
    seen = _count_decodes(monkeypatch, delay_s=0.05)
    statuses = []
    with running_server(create_app(_colour_reward(), limits, {})) as url:

        def post(seed):
            response = httpx.post(f"{url}/v1/score", json=batch_to_json(_batch(2, seed=seed)), timeout=60)
            statuses.append(response.status_code)

        threads = [threading.Thread(target=post, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert statuses == [200] * 6
    assert len(seen["locs"]) == 12 and seen["most_at_once"] == 1  # not one decode per threadpool thread


def _raw_request(url: str, head: bytes, body_start: bytes, timeout_s: float) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
    sock.sendall(head + b"\r\n" + body_start)
    return sock


def test_an_unauthenticated_body_is_refused_before_it_is_read(server_url):
    # Headers announce 190 kB (within max_request_bytes) but only 10 bytes follow: a 401 that waited for
    # the body would never come.
    head = (
        b"POST /v1/score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 190000\r\n"
    )
    with _raw_request(server_url, head, b'{"images":', timeout_s=3.0) as sock:
        start = time.monotonic()
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        assert time.monotonic() - start < 2.0
    # While an authenticated body streams in, /healthz stays open and prompt.
    authorized = head + f"Authorization: Bearer {TOKEN}\r\n".encode()
    with _raw_request(server_url, authorized, b'{"images":', timeout_s=3.0):
        start = time.monotonic()
        assert httpx.get(f"{server_url}/healthz", timeout=3.0).status_code == 200
        assert time.monotonic() - start < 1.0


def test_a_body_that_is_not_json_is_415(http):
    text = b'{"images": [], "prompts": [], "references": []}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        response = http.post("/v1/score", content=text, headers={"content-type": content_type})
        assert response.status_code == 415 and content_type in response.json()["detail"], response.text
    assert http.post("/v1/score", content=text).status_code == 415  # a body with no content type
    ok = http.post("/v1/score", content=text, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def _png_declaring(width: int, height: int) -> str:
    """A 1 x 1 PNG saved by PIL whose header then declares width x height (the CRC redone): a few bytes
    that open as a huge image."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return base64.b64encode(bytes(data)).decode()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns past 89M pixels
def test_an_image_whose_header_declares_too_many_pixels_is_413(http):
    # 1000 x 1000 is over the test's max_image_pixels; 10000 x 10000 is over PIL's warning limit and
    # 20000 x 20000 over its error limit: every one is too large (413), none undecodable (422).
    assert Image.open(io.BytesIO(base64.b64decode(_png_declaring(1000, 1000)))).size == (1000, 1000)
    for width, height in ((1000, 1000), (10000, 10000), (20000, 20000)):
        huge = _png_declaring(width, height)
        response = http.post("/v1/score", json=_replace(_valid_body(1), ("images", 0), huge))
        assert response.status_code == 413, (width, response.text)
        assert "images[0]" in response.json()["detail"] and "max_image_pixels=16384" in response.json()["detail"]
        body = _replace(_valid_body(1), ("references", 0), [{"image": huge, "kind": "face", "caption": ""}])
        response = http.post("/v1/score", json=body)
        assert response.status_code == 413 and "references[0][0].image" in response.json()["detail"], response.text


def test_the_openapi_schema_lists_every_status(http):
    schema = http.get("/openapi.json").json()
    score = schema["paths"]["/v1/score"]["post"]["responses"]
    assert {"200", "400", "401", "413", "415", "422"} <= set(score), sorted(score)
    assert set(schema["paths"]["/v1/info"]["get"]["responses"]) == {"200", "401"}
    assert set(schema["paths"]["/healthz"]["get"]["responses"]) == {"200"}
    assert "bearer" in str(schema["components"]["securitySchemes"]).lower()


def test_non_finite_weights_refuse_to_start():
    with pytest.raises(ValueError, match=r"weights\.colour_target must be a finite number, got inf"):
        build_app(RewardConfig(preset="custom", weights=WeightsConfig(colour_target=math.inf)), {})
    nan_weighted = CompositeReward([ColourTargetScorer(ColourTargetConfig())], {"colour_target": math.nan})
    with pytest.raises(ValueError, match=r"weights\.colour_target=nan"):
        create_app(nan_weighted, LIMITS, {})


def test_the_default_limits_are_consistent():
    from rewards.server import decode_memory_bound

    limits = ServerConfig()
    everything = limits.max_images * (1 + limits.max_references_per_image) * limits.max_image_pixels
    assert limits.max_image_pixels <= limits.max_request_pixels < everything / 50
    # Bytes the budget lets decoding hold: the arrays of two batches and one image's scratch each.
    assert decode_memory_bound(limits) == 2 * (3 * limits.max_request_pixels + 11 * limits.max_image_pixels) < 1.2e9
    with pytest.raises(ValueError, match="max_request_pixels .* must be >= max_image_pixels"):
        ServerConfig(max_image_pixels=4096 * 4096, max_request_pixels=1024 * 1024)
    with pytest.raises(ValueError, match="max_batches_in_flight must be >= 1"):
        ServerConfig(max_batches_in_flight=0)
