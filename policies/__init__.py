"""The FLUX multi-reference policy: model building, reference conditioning, attention control and
LoRA / MoE-LoRA / dual-branch adapters.

    policy = FluxPolicy.from_config(load_config(PolicyConfig, "configs/policy/tiny.yaml"))
    prompts = policy.encode_prompts(["a cat and a dog"], item_phrases=["a cat", "a dog"])
    cond = policy.condition(prompts, [cat_image, dog_image], height=64, width=64)  # images (1, 3, h, w) in [0, 1]
    velocity = policy.velocity_fn(cond)            # for samplers.mixed_rollout: (x_t, sigma) -> v
    out = policy(x_t, sigma, cond, AttentionSwitches(capture=True))   # training: velocity + maps + router
    loss = flow_loss(out.velocity) + 0.3 * dice_loss(out.attention_maps, masks)
    images = policy.decode_latents(latents)        # (B, 3, H, W) in [0, 1]
    policy.save_adapters(folder); policy.load_adapters(folder)
"""

from policies.adapters import load_balancing_loss, moe_gate_weights
from policies.attention import TokenLayout
from policies.components import FluxComponents, build_tiny_components, load_local_components, save_components
from policies.config import (
    AttentionConfig,
    ConditionPromptConfig,
    DualBranchLoRAConfig,
    LoRAConfig,
    MoELoRAConfig,
    PolicyConfig,
    TinyFluxConfig,
)
from policies.ids import mask_tokens
from policies.losses import dice_loss, routing_loss
from policies.policy import (
    AttentionSwitches,
    Conditioning,
    FluxPolicy,
    PolicyOutput,
    PolicyVelocity,
    PromptEmbeds,
    full_tensor,
    placed_like,
)

__all__ = [
    "AttentionConfig",
    "AttentionSwitches",
    "ConditionPromptConfig",
    "Conditioning",
    "DualBranchLoRAConfig",
    "FluxComponents",
    "FluxPolicy",
    "LoRAConfig",
    "MoELoRAConfig",
    "PolicyConfig",
    "PolicyOutput",
    "PolicyVelocity",
    "PromptEmbeds",
    "TinyFluxConfig",
    "TokenLayout",
    "build_tiny_components",
    "dice_loss",
    "full_tensor",
    "load_balancing_loss",
    "load_local_components",
    "mask_tokens",
    "moe_gate_weights",
    "placed_like",
    "routing_loss",
    "save_components",
]
