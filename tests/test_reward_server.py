"""The reward server under a real uvicorn on 127.0.0.1 (OS-assigned port), and its client."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from rewards.config import ColourTargetConfig, FaceConfig, JpegConfig, ServerConfig
from rewards.faces import DlibFaceEmbedder
from rewards.identity import IdentityScorer
from rewards.server import build_app, create_app, running_server, server_token
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
