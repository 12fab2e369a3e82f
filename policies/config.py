"""Policy configuration: frozen stdlib dataclasses (the defaults), merged with YAML and ``key=value``
overrides by the project's config loader. The tiny preset is the embedded default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PositionScheme = Literal["uno", "kontext", "condition_id"]


@dataclass(frozen=True)
class TinyFluxConfig:
    """A FLUX-shaped model small enough for CPU tests: random-init under ``seed``."""

    num_layers: int = 2  # double (MM-DiT) blocks
    num_single_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, ...] = (4, 6, 6)  # sums to attention_head_dim (FLUX.1: 16/56/56 of 128)
    joint_attention_dim: int = 32  # T5 hidden size
    pooled_projection_dim: int = 32  # CLIP projection size
    guidance_embeds: bool = False
    # The latent codec: an exact, invertible pixel-(un)shuffle plus a fixed orthogonal channel mix, so
    # decoded images follow the latents (a random-init AutoencoderKL decoder barely depends on them).
    vae_scale_factor: int = 2  # pixels per latent cell along each side
    text_layers: int = 1  # tiny CLIP and T5 encoders: widths pooled_projection_dim and joint_attention_dim
    clip_max_length: int = 77
    t5_max_length: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope entries must be even (rotary pairs), got {self.axes_dims_rope}")


@dataclass(frozen=True)
class LoRAConfig:
    """Plain LoRA (peft) on the attention projections of every block."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 8.0
    target_modules: tuple[str, ...] = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    )


@dataclass(frozen=True)
class MoELoRAConfig:
    """MoE-LoRA on the FFN output layers (MultiCrafter Sec. 4.3): double blocks ``ff.net.2`` and
    ``ff_context.net.2``, single blocks ``proj_out`` (never the model's final ``proj_out``)."""

    enabled: bool = True
    num_experts: int = 4
    top_k: int = 1
    rank: int = 8
    alpha: float = 8.0
    freeze_gate: bool = False  # RL option: keep expert choice fixed while the experts train


@dataclass(frozen=True)
class DualBranchLoRAConfig:
    """MUSAR's dual-branch LoRA: no LoRA on prompt tokens, a low-rank branch on noisy-image tokens and a
    high-rank branch on condition tokens (paper: 4 and 128), on the same layers as plain LoRA."""

    enabled: bool = False
    noisy_rank: int = 4
    condition_rank: int = 16
    alpha_ratio: float = 1.0  # alpha = alpha_ratio * rank for each branch


@dataclass(frozen=True)
class ConditionPromptConfig:
    """MUSAR's per-condition prompt tokens (Sec. 3.2.1): the input is [CI^1; CT^1; ...; CI^c; CT^c; T; X],
    each condition image CI^i with its own caption tokens CT^i. When enabled, each reference's caption is
    T5-encoded on its own, padded or cut to ``tokens`` (m'), and appended after the target prompt T in the
    text stream (FLUX's frozen prompt weights, no adapter). The routing masks treat CI^i and CT^i as one
    condition: static routing keeps them from the target prompt and from other conditions, dynamic
    routing hides both from the noisy tokens routed elsewhere."""

    enabled: bool = False
    tokens: int = 32  # m', T5 tokens per caption (MUSAR gives no value)

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"condition_prompts.tokens must be >= 1, got {self.tokens}")


@dataclass(frozen=True)
class AttentionConfig:
    """The attention mode of the policy: what the processor installs and which features every model call
    runs with (warm-start training, RL rollouts and updates, evaluation and generation alike), so the model
    RL trains and evaluation scores is the one the warm start produced. Part of the saved ``policy.yaml``."""

    temperature: bool = False  # One-for-All Dynamic Attention Modulation (adds a small MLP per block)
    # MUSAR static routing: prompt and condition tokens never attend each other, nor two conditions
    # (stage diptych trains with it, so a diptych-trained policy runs with it everywhere).
    static_routing: bool = False
    # MUSAR dynamic routing (Eq. 2-4): each noisy token attends only to the condition whose caption it
    # scores highest on. An inference-time mode (warm-start training refuses it); needs every reference's
    # caption inside the prompt.
    dynamic_routing: bool = False
    temperature_hidden: int = 16
    temperature_min: float = 0.01
    capture_chunk_rows: int = 256  # reference query rows per fp32 chunk when capturing maps


@dataclass(frozen=True)
class PolicyConfig:
    source: Literal["tiny", "local"] = "tiny"
    path: str | None = None  # a local diffusers folder (FLUX.1-dev or FLUX.1-Kontext-dev layout)
    tiny: TinyFluxConfig = field(default_factory=TinyFluxConfig)
    position_scheme: PositionScheme = "uno"
    # condition_id scheme (One-for-All): a reference of category condition_categories[i] gets id i + 1,
    # in warm-start and RL training alike. The default is the embedded synthetic shapes
    # (rl_align.core.synthetic.SHAPES); One-for-All's preset has face, upper garment, lower garment, bag.
    condition_categories: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    moe_lora: MoELoRAConfig = field(default_factory=MoELoRAConfig)
    dual_branch: DualBranchLoRAConfig = field(default_factory=DualBranchLoRAConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    condition_prompts: ConditionPromptConfig = field(default_factory=ConditionPromptConfig)
    dtype: Literal["float32", "bfloat16"] = "float32"  # base weights; adapters always train in fp32
    guidance_scale: float = 3.5  # used only by guidance-distilled models (FLUX.1-dev)
    adapter_seed: int = 0

    def __post_init__(self) -> None:
        if self.source == "local" and not self.path:
            raise ValueError("source is 'local' but path is not set: name the diffusers folder in policy.path")
        if self.lora.enabled and self.dual_branch.enabled:
            raise ValueError("lora.enabled and dual_branch.enabled both adapt the attention projections; pick one")
