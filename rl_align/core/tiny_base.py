"""The embedded default's base model: a small FLUX-shaped transformer fully trained with flow matching on
the synthetic multi-subject scenes, so that given a prompt and reference shapes its images show those
shapes on white. It is saved as a local diffusers folder (transformer, tiny codec, tiny text encoders and
tokenizers) and loaded through ``policy.source: local`` like FLUX.1-dev.

Built on first use (``TinyBaseConfig.build_if_missing``) into ``policy.path``: deterministic for its
config (seed included), written to a temporary folder and renamed into place when complete, so an
interrupted build leaves nothing half-written. Next to the model parts it writes ``base.json`` (the build
config, the loss curve, the time taken) and ``samples.png`` (held-out scenes: references, target, sample).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from policies import FluxComponents, FluxPolicy, PolicyConfig, TinyFluxConfig, save_components
from rl_align.core.config import to_dict
from rl_align.core.flow_matching import TimestepConfig, flow_matching_pair, sample_timesteps
from rl_align.core.images import images_to_uint8
from rl_align.core.optim import apply_step
from rl_align.core.synthetic import compose_scene, render_reference, sample_subjects, scene_prompt
from rl_align.core.tracking import save_image_grid
from samplers.noise import key_seed, keyed_normal
from samplers.rollout import ode_solve
from samplers.schedule import flux_sigmas

log = logging.getLogger(__name__)

BASE_FILE = "base.json"


@dataclass(frozen=True)
class TinyBaseConfig:
    """How the tiny base is trained (all of the transformer, no adapters)."""

    build_if_missing: bool = False  # train it into policy.path (source local) when that folder does not exist
    model: TinyFluxConfig = field(
        default_factory=lambda: TinyFluxConfig(num_layers=3, num_single_layers=3, num_attention_heads=4, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
    )
    steps: int = 2000
    batch_size: int = 16
    learning_rate: float = 1.0e-3
    max_grad_norm: float = 1.0
    image_size: int = 32  # scene side in pixels
    reference_size: int = 16
    min_subjects: int = 1
    max_subjects: int = 2
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    sample_steps: int = 16  # Euler steps of the held-out samples in samples.png
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.sample_steps) < 1:
            raise ValueError("steps, batch_size and sample_steps must be >= 1")
        if not 1 <= self.min_subjects <= self.max_subjects:
            raise ValueError(f"need 1 <= min_subjects <= max_subjects, got {self.min_subjects}, {self.max_subjects}")


class SceneBatch(NamedTuple):
    """B synthetic scenes with the same number n of subjects (one token layout per batch)."""

    prompts: list[str]
    references: list[torch.Tensor]  # n tensors (B, 3, r, r) in [0, 1], one per subject slot
    targets: torch.Tensor  # (B, 3, H, W) in [0, 1]


def scene_batch(rng: np.random.Generator, count: int, batch: int, cfg: TinyBaseConfig) -> SceneBatch:
    """``batch`` scenes of ``count`` distinct-colour subjects each, drawn from ``rng``."""
    prompts, references, targets = [], [[] for _ in range(count)], []
    for _ in range(batch):
        subjects = sample_subjects(rng, count)
        scene, _ = compose_scene(subjects, cfg.image_size, rng)
        prompts.append(scene_prompt(subjects))
        targets.append(scene)
        for slot, subject in enumerate(subjects):
            references[slot].append(render_reference(subject, cfg.reference_size))

    def tensor(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0

    return SceneBatch(prompts, [tensor(r) for r in references], tensor(targets))


def base_policy_config(cfg: TinyBaseConfig) -> PolicyConfig:
    """The random-init model the base starts from: the tiny preset at cfg.model's size, no adapters."""
    policy = PolicyConfig(tiny=cfg.model)
    return dataclasses.replace(policy, lora=dataclasses.replace(policy.lora, enabled=False), moe_lora=dataclasses.replace(policy.moe_lora, enabled=False))


def flow_loss(policy: FluxPolicy, batch: SceneBatch, generator: torch.Generator, cfg: TinyBaseConfig) -> torch.Tensor:
    """Flow matching on the scenes: mean ||v_theta(x_t, t) - (eps - x0)||^2."""
    conditioning = policy.condition(policy.encode_prompts(batch.prompts), batch.references, cfg.image_size, cfg.image_size)
    x0 = policy.encode_images(batch.targets)
    noise = torch.randn(x0.shape, generator=generator)
    t = sample_timesteps(x0.shape[0], generator, cfg.timesteps)
    x_t, target = flow_matching_pair(x0, noise, t)
    return torch.nn.functional.mse_loss(policy(x_t, t, conditioning).velocity, target)


def train_base(cfg: TinyBaseConfig) -> tuple[FluxPolicy, list[float]]:
    """The trained base and its loss per step (AdamW on every transformer weight, gradient clipping)."""
    policy = FluxPolicy.from_config(base_policy_config(cfg))
    policy.transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW(policy.transformer.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(key_seed("tiny-base-noise", cfg.seed) % 2**63)
    losses = []
    progress = tqdm(range(cfg.steps), desc="tiny base", dynamic_ncols=True)
    for step in progress:
        rng = np.random.default_rng(key_seed("tiny-base-scenes", cfg.seed, step))
        count = int(rng.integers(cfg.min_subjects, cfg.max_subjects + 1))
        loss = flow_loss(policy, scene_batch(rng, count, cfg.batch_size, cfg), generator, cfg)
        loss.backward()
        apply_step(optimizer, cfg.max_grad_norm, bool(torch.isfinite(loss)), what=f"tiny base step {step}")
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    policy.transformer.requires_grad_(False)
    return policy.eval(), losses


@torch.no_grad()
def save_base_samples(policy: FluxPolicy, cfg: TinyBaseConfig, path: Path, scenes: int = 4) -> None:
    """Held-out two-subject scenes, a row each: the references (stretched to the scene size), the target
    scene and the base's sample from keyed noise (cfg.sample_steps Euler steps)."""
    rng = np.random.default_rng(key_seed("tiny-base-held-out", cfg.seed))
    batch = scene_batch(rng, min(2, cfg.max_subjects), scenes, cfg)
    conditioning = policy.condition(policy.encode_prompts(batch.prompts), batch.references, cfg.image_size, cfg.image_size)
    shape = policy.latent_shape(cfg.image_size, cfg.image_size)
    noise = torch.stack([keyed_normal(shape, "tiny-base-samples", cfg.seed, i) for i in range(scenes)])
    sigmas = flux_sigmas(cfg.sample_steps, conditioning.layout.noisy)
    samples = policy.decode_latents(ode_solve(policy.velocity_fn(conditioning), noise, sigmas))
    size = (cfg.image_size, cfg.image_size)
    references = [torch.nn.functional.interpolate(r, size=size, mode="nearest") for r in batch.references]
    tiles = torch.stack([*references, batch.targets, samples], dim=1).flatten(0, 1)  # (scenes * (n + 2), 3, H, W)
    save_image_grid(images_to_uint8(tiles), path, columns=len(references) + 2)


def build_tiny_base(cfg: TinyBaseConfig, folder: Path) -> Path:
    """Train the base and write it to ``folder`` (which must not exist): the diffusers parts, base.json and
    samples.png, through a temporary sibling folder renamed into place when complete."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; the tiny base is built into a new folder only")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    log.info("building the tiny base (%d steps of flow matching on synthetic scenes) into %s", cfg.steps, folder)
    policy, losses = train_base(cfg)
    components = FluxComponents(policy.transformer, policy.codec, policy.text_encoder, policy.tokenizer, policy.text_encoder_2, policy.tokenizer_2, policy.t5_max_length)
    save_components(components, partial)
    save_base_samples(policy, cfg, partial / "samples.png")
    seconds = time.monotonic() - started
    fifth = max(1, len(losses) // 5)
    report = {
        "config": to_dict(cfg),
        "parameters": sum(p.numel() for p in policy.transformer.parameters()),
        "seconds": round(seconds, 1),
        "loss_first_fifth": float(np.mean(losses[:fifth])),
        "loss_last_fifth": float(np.mean(losses[-fifth:])),
        "loss": [round(v, 5) for v in losses],
    }
    (partial / BASE_FILE).write_text(json.dumps(report, indent=1))
    partial.rename(folder)
    log.info("tiny base built in %.0f s: loss %.3f -> %.3f, samples in %s", seconds, report["loss_first_fifth"], report["loss_last_fifth"], folder / "samples.png")
    return folder


def ensure_base(policy: PolicyConfig, cfg: TinyBaseConfig) -> None:
    """Build the tiny base into policy.path first when the config asks for it and the folder is missing."""
    if cfg.build_if_missing and policy.source == "local" and policy.path and not Path(policy.path).exists():
        build_tiny_base(cfg, Path(policy.path))
