"""IPPO pieces that touch the policy but not Ray: conditioning a task, rolling out a chunk of a group, and
the adapters-off reference velocity of the KL term.

Rollout workers and the learner call the same functions, so both build identical conditioning from a
task and the learner's recomputed log-probs match the rollout's (the ratio starts at exactly 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from policies import Conditioning, FluxPolicy
from policies.policy import PolicyVelocity
from rewards.types import ReferenceSubject
from rl_align.core.images import images_to_uint8
from rl_align.ippo.tasks import Task
from samplers import GroupKey, SamplerConfig, WindowTransition, mixed_rollout


@dataclass(frozen=True)
class RolloutConfig:
    image_size: int = 64  # generated images are image_size x image_size pixels
    reference_size: int = 32  # each reference image is resized to reference_size x reference_size
    group_size: int = 8  # N images per (prompt, reference set), all from the same initial noise
    groups_per_iteration: int = 2
    chunk_size: int = 4  # samples per rollout call (one model batch); the learner uses the same chunks

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of a group), got {self.group_size}")
        if not 1 <= self.chunk_size <= self.group_size:
            raise ValueError(f"chunk_size must be in [1, group_size={self.group_size}], got {self.chunk_size}")
        if self.groups_per_iteration < 1:
            raise ValueError(f"groups_per_iteration must be >= 1, got {self.groups_per_iteration}")

    def chunks(self) -> list[tuple[int, ...]]:
        """The sample ids of each rollout call within a group."""
        ids = list(range(self.group_size))
        return [tuple(ids[i : i + self.chunk_size]) for i in range(0, self.group_size, self.chunk_size)]


class ChunkTransitions(NamedTuple):
    """What the learner needs of one rollout chunk of n samples."""

    transitions: tuple[WindowTransition, ...]  # window steps (with their eta and reduction), tensors on the CPU
    # MoE-LoRA: per window step, the top-1 expert of every routed token, (n, R) int16; None without experts.
    experts: tuple[torch.Tensor, ...] | None


class ChunkRollout(NamedTuple):
    """One rollout call's output: the reward workers need only the images, the learners only the
    transitions."""

    group: int
    sample_ids: tuple[int, ...]
    learner_input: ChunkTransitions
    images: np.ndarray  # (n, H, W, 3) uint8


class _WindowExperts:
    """A policy velocity that keeps the top-1 experts of its calls at the window's sigmas (every step of a
    rollout has its own sigma), so the window steps' routing can be picked out afterwards."""

    def __init__(self, velocity: PolicyVelocity, window_sigmas: set[float]):
        self.velocity, self.window_sigmas = velocity, window_sigmas
        self.experts: dict[float, torch.Tensor] = {}

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = self.velocity(x_t, sigma)
        at = float(sigma[0])
        if at in self.window_sigmas:
            experts = self.velocity.last_experts
            if experts is not None:
                self.experts[at] = experts.cpu()
        return v


def reference_tensor(subject: ReferenceSubject, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: the reference image resized (bilinear, antialiased)."""
    image = torch.tensor(subject.image).permute(2, 0, 1)[None].float() / 255.0  # copies: the array may be read-only
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def condition_task(policy: FluxPolicy, task: Task, height: int, width: int, reference_size: int) -> Conditioning:
    """Encode the task's prompt and references (each resized to reference_size pixels) for a target of
    height x width pixels: the one conditioning of RL, evaluation and generation. When the policy needs
    item phrases (condition-id positions, dynamic routing), each reference's caption is its phrase in the
    prompt; with per-condition prompts (MUSAR) the caption is also encoded as that reference's own tokens.
    Under the ``condition_id`` scheme a reference's condition id comes from its category
    (policy.condition_categories, as in warm-start training); a task without categories numbers its
    references 1, 2, ... instead."""
    captions = [r.caption for r in task.references]
    prompts = policy.encode_prompts([task.prompt], item_phrases=captions if policy.needs_item_phrases else None, condition_captions=[captions])
    references = [reference_tensor(r, reference_size) for r in task.references]
    condition_ids = None
    if policy.cfg.position_scheme == "condition_id":
        condition_ids = policy.condition_ids(task.categories) if task.categories else tuple(range(1, len(references) + 1))
    return policy.condition(prompts, references, height, width, condition_ids)


def task_conditioning(policy: FluxPolicy, task: Task, cfg: RolloutConfig) -> Conditioning:
    """The task's conditioning for the rollout's square images."""
    return condition_task(policy, task, cfg.image_size, cfg.image_size, cfg.reference_size)


def image_seq_len(policy: FluxPolicy, cfg: RolloutConfig) -> int:
    """Packed noisy tokens of one image (2x2 patches of the latent grid): sets FLUX's schedule shift."""
    _, h, w = policy.latent_shape(cfg.image_size, cfg.image_size)
    return (h // 2) * (w // 2)


@torch.no_grad()
def rollout_chunk(
    policy: FluxPolicy,
    task: Task,
    key: GroupKey,
    sample_ids: Sequence[int],
    window: Sequence[int],
    sampler: SamplerConfig,
    cfg: RolloutConfig,
) -> ChunkRollout:
    """Mixed ODE/SDE rollout of the listed samples of one group, decoded to images, with the MoE-LoRA
    expert choices of the window steps when the policy has experts."""
    sigmas = sampler.sigmas(image_seq_len(policy, cfg))
    velocity = _WindowExperts(policy.velocity_fn(task_conditioning(policy, task, cfg)), {float(sigmas[i]) for i in window})
    out = mixed_rollout(
        velocity, key, policy.latent_shape(cfg.image_size, cfg.image_size), sigmas,
        window, sampler.eta, samples=sample_ids, reduce=sampler.logprob_reduce, tail_solver=sampler.tail_solver,
        tail_keep_fraction=sampler.tail_keep_fraction, device=policy.device,
    )
    transitions = tuple(t._replace(x_t=t.x_t.cpu(), x_next=t.x_next.cpu(), log_prob=t.log_prob.cpu()) for t in out.transitions)
    experts = tuple(velocity.experts[t.sigma] for t in out.transitions) if velocity.experts else None
    return ChunkRollout(key.group, tuple(sample_ids), ChunkTransitions(transitions, experts), images_to_uint8(policy.decode_latents(out.latents)))


class ReferenceVelocity:
    """The reference policy of the KL term: the same model and conditioning with its adapters off."""

    def __init__(self, policy: FluxPolicy, conditioning: Conditioning):
        self.velocity = policy.velocity_fn(conditioning)
        self.policy = policy

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with self.policy.adapters_disabled():
            return self.velocity(x_t, sigma)
