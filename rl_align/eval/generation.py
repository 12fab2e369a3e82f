"""Images from a policy and reference subjects: the inference entry point behind ``scripts/generate.py``
and the generation step of ``scripts/evaluate.py``.

A policy is named by a spec, ``PATH[@ADAPTERS]``:
- a run folder (of ``scripts/sft.py`` or ``scripts/train_gspo.py``): its ``policy.yaml`` and its final
  ``adapters/``;
- a policy YAML file (a preset such as ``configs/policy/tiny.yaml``, or a run's ``policy.yaml``): that
  policy with freshly initialized adapters, which leave the base unchanged (every LoRA's B is zero);
- a local diffusers folder (``model_index.json`` or ``transformer/``): the base model alone; with ``@ADAPTERS`` the adapter
  layout and attention mode come from the adapter folder's ``adapter_config.json``.
``@ADAPTERS`` loads those adapters instead of the run's: an adapter folder, or a checkpoint file of a run
(``checkpoints/iteration-N.pt`` of ``scripts/train_gspo.py`` or ``scripts/sft.py``) after a run folder or a
policy YAML file, which say the adapter layout a checkpoint does not record: ``runs/R@runs/R/checkpoints/
iteration-00000060.pt`` evaluates the policy after 60 iterations as it is. The policy runs in its attention mode
(``PolicyConfig.attention``: static routing, temperature, dynamic routing) exactly as RL rolls it out.

Image k of every task starts from noise keyed by ``seed + k`` alone, so every policy and every task see the
same K noises, and ``--seed 3 --num-images 1`` reproduces image 3 of ``--seed 0 --num-images 4``. Sampling
is the probability-flow ODE (Euler or DPM-Solver++(2M)) on the sampler's schedule; everything is
deterministic, so the same arguments give byte-identical PNGs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from policies import FluxPolicy, PolicyConfig
from policies.policy import with_adapters_of
from rl_align.core.checkpoints import load_checkpoint
from rl_align.core.config import apply_overrides, load_config
from rl_align.core.errors import RunFolderError, SetupError
from rl_align.core.images import images_to_uint8
from rl_align.ippo.rollout import condition_task
from rl_align.ippo.tasks import Task
from samplers import SamplerConfig
from samplers.noise import keyed_normal
from samplers.rollout import ode_solve

log = logging.getLogger(__name__)

POLICY_FILE = "policy.yaml"
ADAPTERS_FOLDER = "adapters"
CHECKPOINT_SUFFIX = ".pt"


@dataclass(frozen=True)
class GenerationConfig:
    num_images: int = 4  # K images per task
    seed: int = 0  # image k starts from the noise of seed + k
    steps: int = 16  # ODE steps
    height: int = 64
    width: int = 64
    reference_size: int = 32  # each reference is resized to this square, as in RL rollouts
    solver: Literal["euler", "dpmpp_2m"] = "euler"
    # The schedule's time shift, as in SamplerConfig: FLUX's resolution-dependent one, a static s, or none.
    time_shift: Literal["dynamic", "static", "none"] = "dynamic"
    static_shift: float = 3.0
    batch_size: int = 4  # images per model call

    def __post_init__(self) -> None:
        for name in ("num_images", "steps", "height", "width", "reference_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def sigmas(self, image_seq_len: int) -> torch.Tensor:
        """The (steps + 1,) schedule for images of ``image_seq_len`` packed tokens."""
        sampler = SamplerConfig(num_steps=self.steps, time_shift=self.time_shift, static_shift=self.static_shift, window_size=1)
        return sampler.sigmas(image_seq_len)


class PolicySource(NamedTuple):
    """A resolved policy spec: the policy to build and the adapters to load into it (None: its own)."""

    spec: str
    config: PolicyConfig
    adapters: Path | None


def resolve_policy(spec: str, overrides: Sequence[str] = ()) -> PolicySource:
    """The policy named by ``PATH[@ADAPTERS]`` (see the module docstring), with ``key=value`` overrides
    of its PolicyConfig (``attention.dynamic_routing=true``, ``guidance_scale=2.5``). Raises SetupError
    naming the path when it is none of the three kinds, or ConfigError for a bad override."""
    path_text, _, adapters_text = spec.partition("@")
    path = Path(path_text)
    adapters = Path(adapters_text) if adapters_text else None
    if adapters is not None and not (adapters.is_dir() or (adapters.is_file() and adapters.suffix == CHECKPOINT_SUFFIX)):
        raise SetupError(f"policy {spec!r}: {adapters} is neither an adapter folder nor a checkpoint file (*{CHECKPOINT_SUFFIX})")
    overrides = list(overrides)
    if path.is_dir() and (path / POLICY_FILE).is_file():
        run_adapters = path / ADAPTERS_FOLDER
        if adapters is None:
            if not run_adapters.is_dir():
                raise SetupError(f"policy {spec!r}: run folder {path} has no {ADAPTERS_FOLDER}/ (did the run finish?); name adapters with {path}@ADAPTERS")
            adapters = run_adapters
        config = load_config(PolicyConfig, path / POLICY_FILE, overrides)
    elif path.is_file() and path.suffix in (".yaml", ".yml"):
        config = load_config(PolicyConfig, path, overrides)
    elif path.is_dir() and ((path / "model_index.json").is_file() or (path / "transformer").is_dir()):
        base = load_config(PolicyConfig, None, ["source=local", f"path={path}", "lora.enabled=false", "moe_lora.enabled=false"])
        if adapters is not None and adapters.is_file():
            raise SetupError(f"policy {spec!r}: checkpoint {adapters} does not record its adapter layout; name its run folder instead (RUN@{adapters})")
        if adapters is not None:
            try:
                base = with_adapters_of(base, adapters)
            except (FileNotFoundError, ValueError) as exc:
                raise SetupError(f"policy {spec!r}: {exc}") from None
        config = apply_overrides(base, overrides)
    else:
        raise SetupError(
            f"policy {spec!r}: {path} is not a run folder (with {POLICY_FILE}), a policy YAML file or a diffusers folder (with model_index.json or transformer/)"
        )
    return PolicySource(spec, config, adapters)


def load_policy(source: PolicySource, device: str = "cpu") -> FluxPolicy:
    """Build the policy and load its adapters; errors name the spec."""
    try:
        policy = FluxPolicy.from_config(source.config)
        if source.adapters is not None and source.adapters.is_file():
            policy.load_adapter_state(load_checkpoint(source.adapters, restore_rng=False).adapters, source=f"checkpoint {source.adapters}")
        elif source.adapters is not None:
            policy.load_adapters(source.adapters)
    except (FileNotFoundError, ValueError, RunFolderError) as exc:
        raise SetupError(f"policy {source.spec!r}: {exc}") from None
    policy.eval()
    return policy.to(device)


def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """(len(seeds), *latent_shape) fp32: image k's noise depends on its seed alone."""
    return torch.stack([keyed_normal(latent_shape, "generate", int(seed)) for seed in seeds])


@torch.no_grad()
def generate(policy: FluxPolicy, task: Task, cfg: GenerationConfig) -> np.ndarray:
    """cfg.num_images images of ``task`` -> (K, H, W, 3) uint8, image k from seed cfg.seed + k."""
    try:
        conditioning = condition_task(policy, task, cfg.height, cfg.width, cfg.reference_size)
    except ValueError as exc:
        raise SetupError(f"task {task.prompt!r}: {exc}") from None
    velocity = policy.velocity_fn(conditioning)
    shape = policy.latent_shape(cfg.height, cfg.width)
    sigmas = cfg.sigmas(conditioning.layout.noisy)
    images = []
    for start in range(0, cfg.num_images, cfg.batch_size):
        seeds = range(cfg.seed + start, cfg.seed + min(start + cfg.batch_size, cfg.num_images))
        latents = ode_solve(velocity, initial_noise(seeds, shape).to(policy.device), sigmas, cfg.solver)
        images.append(images_to_uint8(policy.decode_latents(latents)))
    return np.concatenate(images)


def save_png(image: np.ndarray, path: Path) -> None:
    """A PNG with no metadata: the same pixels give the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", optimize=False)


def generation_settings(cfg: GenerationConfig, source: PolicySource) -> dict:
    """What a generation folder records about how its images were made."""
    return {
        "policy": source.spec,
        "adapters": str(source.adapters) if source.adapters else None,
        "attention": dataclasses.asdict(source.config.attention),
        "position_scheme": source.config.position_scheme,
        "guidance_scale": source.config.guidance_scale,
        **dataclasses.asdict(cfg),
    }


__all__ = [
    "GenerationConfig",
    "PolicySource",
    "generate",
    "generation_settings",
    "initial_noise",
    "load_policy",
    "resolve_policy",
    "save_png",
]
