"""Shared set-up for the policy tests: a tiny policy and a two-reference conditioning on CPU."""

from __future__ import annotations

import torch

from policies import AttentionConfig, FluxPolicy, PolicyConfig
from policies.ids import pack_latents

PROMPTS = ["a cat and a dog on the grass", "a cat and a dog on the sand"]
PHRASES = ["a cat", "a dog"]
HEIGHT = WIDTH = 32  # tiny codec factor 2 -> 16x16 latents -> 8x8 = 64 noisy tokens
REFERENCE_SIZE = 16  # 4x4 = 16 tokens per reference


def tiny_policy(**overrides) -> FluxPolicy:
    """The tiny preset (LoRA + MoE-LoRA) with the temperature MLP and small capture chunks (so the
    chunking is exercised), unless overridden."""
    fields = {"attention": AttentionConfig(temperature=True, capture_chunk_rows=5)}
    fields.update(overrides)
    return FluxPolicy.from_config(PolicyConfig(**fields))


def randomize_adapters(policy: FluxPolicy, seed: int = 0, scale: float = 0.05) -> None:
    """Give every trainable adapter tensor a random value (LoRA B matrices start at zero, which would
    hide the adapters' effect and their gradients)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(policy.named_parameters(), key=lambda item: item[0]):
            if "lora_B" in name or "noisy_B" in name or "condition_B" in name or "temperature" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def references(seed: int = 0, batch: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, REFERENCE_SIZE, REFERENCE_SIZE, generator=generator) for _ in PHRASES]


def conditioning(policy: FluxPolicy, prompts=PROMPTS, seed: int = 0, **kwargs):
    embeds = policy.encode_prompts(prompts, item_phrases=PHRASES)
    return policy.condition(embeds, references(seed), HEIGHT, WIDTH, **kwargs)


def latents(policy: FluxPolicy, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *policy.latent_shape(HEIGHT, WIDTH), generator=generator)


def transformer_inputs(cond, x: torch.Tensor, sigma: torch.Tensor) -> dict:
    """Keyword arguments of a raw FluxTransformer2DModel call equivalent to ``policy(x, sigma, cond)``."""
    return dict(
        hidden_states=torch.cat([pack_latents(x), cond.reference_tokens], dim=1),
        encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled_prompt_embeds,
        timestep=sigma, img_ids=cond.img_ids, txt_ids=cond.txt_ids,
    )
