"""Reward benchmarks, measured side by side in one run:

1. Throughput of scoring through the REST server (real uvicorn on 127.0.0.1, client with PNG/base64
   JSON) versus in-process on the same batch, as a ratio (the issue's target: >= 0.8), for the
   weight-free quickstart reward and for the dlib face-identity reward on real photos.
2. The cost of Hungarian matching against the embedding step of the face-identity reward.

    python benchmarks/reward_throughput.py [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards import (  # noqa: E402
    ReferenceSubject,
    RewardConfig,
    ScoreBatch,
    build_reward,
    matched_similarity_sum,
)
from rewards.client import RewardClient  # noqa: E402
from rewards.server import create_app, reward_info, running_server  # noqa: E402
from rl_align.core.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "rewards"


def median_seconds(*fns: Callable[[], object], repeats: int) -> list[float]:
    """Median wall time of each function. The functions take turns (a, b, a, b, ...), so a change in the
    machine's load during the run affects all of them alike and their ratio stays meaningful."""
    for fn in fns:
        fn()  # warm-up (lazy imports, first-call allocations, connection set-up)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def random_batch(n: int, size: int, seed: int = 0) -> ScoreBatch:
    rng = np.random.default_rng(seed)
    # Smooth-ish images (like decoder outputs), not white noise, so PNG sizes are realistic.
    low = rng.integers(0, 256, size=(n, size // 8, size // 8, 3), dtype=np.uint8)
    images = [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in low]
    return ScoreBatch(images=images, prompts=["a photo"] * n)


def face_batch(n: int) -> ScoreBatch:
    """Groups of generated stand-ins: two people side by side (astronaut + one of the group photo's),
    with the two references each image should show."""
    import insightface.data
    import skimage.data

    astronaut = skimage.data.astronaut()[30:210, 130:310]
    group = np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1])
    person = group[230:440, 10:230]
    refs = [ReferenceSubject(astronaut, "face"), ReferenceSubject(person, "face")]
    tile = lambda im: np.asarray(Image.fromarray(im).resize((192, 192)))  # noqa: E731
    canvas = np.concatenate([tile(astronaut), tile(person)], axis=1)  # (192, 384, 3)
    return ScoreBatch(images=[canvas] * n, prompts=["two people"] * n, references=[refs] * n)


def server_vs_in_process(name: str, cfg: RewardConfig, batch: ScoreBatch, repeats: int) -> None:
    reward = build_reward(cfg)
    app = create_app(reward, cfg.server, reward_info(cfg))
    with (
        running_server(app) as url,
        RewardClient(url, timeout_s=600) as png,
        RewardClient(url, timeout_s=600, image_format="jpeg") as jpeg,
    ):
        # JPEG transport encodes ~15x faster than PNG at 256 px, at the price of slightly lossy pixels.
        in_process, served, served_jpeg = median_seconds(
            lambda: reward.score(batch), lambda: png.score(batch), lambda: jpeg.score(batch), repeats=repeats
        )
    n = len(batch)
    print(
        f"{name:<22} batch {n:>3}: in-process {n / in_process:8.1f} img/s | server {n / served:8.1f} img/s "
        f"| server/in-process ratio {in_process / served:.2f} (JPEG transport: {in_process / served_jpeg:.2f})"
    )


def hungarian_vs_embedding(batch: ScoreBatch, repeats: int) -> None:
    cfg = load_config(RewardConfig, CONFIGS / "offline_faces.yaml")
    embedder = build_reward(cfg).scorers["id"].embedders["face"]
    faces = embedder.detect_and_embed(batch.images[0]).embeddings
    refs = np.stack([embedder.embed_reference(s, "ref") for s in batch.references[0]])
    sim = embedder.similarity(refs, faces)
    inner = 1000  # matchings per timed call: one takes microseconds
    embed_s, match_s = median_seconds(
        lambda: [embedder.detect_and_embed(im) for im in batch.images],
        lambda: [matched_similarity_sum(sim) for _ in range(inner)],
        repeats=repeats,
    )
    embed_s, match_s = embed_s / len(batch), match_s / inner
    print(
        f"face id, per image ({sim.shape[0]} refs x {sim.shape[1]} faces): dlib detect+embed {embed_s * 1e3:.2f} ms, "
        f"Hungarian {match_s * 1e6:.1f} us -> matching is {match_s / embed_s:.2e} of the embedding cost"
    )
    rng = np.random.default_rng(0)
    for n in (2, 4, 8, 16, 64):
        square = rng.uniform(-1, 1, size=(n, n))
        cost = median_seconds(lambda sim=square: [matched_similarity_sum(sim) for _ in range(100)], repeats=repeats)[0]
        cost /= 100
        print(f"  Hungarian on {n:>2} x {n:<2}: {cost * 1e6:8.1f} us  ({cost / embed_s:.2e} of one image's embedding)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    quickstart = load_config(RewardConfig, CONFIGS / "quickstart.yaml")
    for size in (64, 256):
        server_vs_in_process(f"quickstart {size}px", quickstart, random_batch(args.batch, size), args.repeats)
    faces = face_batch(args.batch)
    server_vs_in_process(
        "dlib faces 192x384px", load_config(RewardConfig, CONFIGS / "offline_faces.yaml"), faces, args.repeats
    )
    hungarian_vs_embedding(faces, args.repeats)


if __name__ == "__main__":
    main()
