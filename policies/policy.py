"""The FLUX multi-reference policy: prompt and reference conditioning, the model call with per-call
attention features, the batch-size-invariant velocity for the samplers, and adapter save/load."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.utils.checkpoint
from diffusers import FluxPipeline
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import cast_adapter_dtype
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from policies.adapters import (
    PEFT_ADAPTER_NAME,
    DualBranchLoRALinear,
    ForwardContext,
    MoELoRALinear,
    RouterRecord,
    custom_adapter_state,
    install_dual_branch_lora,
    install_moe_lora,
    peft_lora_config,
)
from policies.attention import AttentionControl, CaptureMethod, PolicyAttnProcessor, TemperatureMLP, TokenLayout, normalize_maps
from policies.components import FluxComponents, build_tiny_components, load_local_components
from policies.config import ConditionPromptConfig, PolicyConfig
from policies.ids import GridSize, grid_ids, pack_latents, reference_ids, text_ids, unpack_latents

ADAPTER_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(folder) finds it
CUSTOM_WEIGHTS_FILE = "policy_adapters.safetensors"
LORA_KEY_PREFIX = "transformer."  # diffusers' LoRA files name the transformer's keys so
ADAPTER_FORMAT = "rl-align-policy-adapters/1"


class PromptEmbeds(NamedTuple):
    prompt_embeds: torch.Tensor  # (B, T + sum m'_i, D) T5 token embeddings: the prompt, then any condition captions
    pooled_prompt_embeds: torch.Tensor  # (B, P) CLIP pooled embedding of the prompt
    item_spans: tuple[tuple[int, int], ...] | None  # [start, end) T5-token span of each reference's phrase
    caption_tokens: tuple[int, ...] = ()  # m'_i of each reference's caption tokens (per-condition prompts)


class Conditioning(NamedTuple):
    """Everything but the noisy latents and the time: prompt, packed references and position ids.
    The batch is 1 (broadcast to any batch of latents) or the latents' batch; every sample shares the
    token layout and ids."""

    prompt_embeds: torch.Tensor  # (B, T, D): the text stream, the prompt then any condition captions (layout.text)
    pooled_prompt_embeds: torch.Tensor  # (B, P)
    reference_tokens: torch.Tensor  # (B, sum n_i, 4C) packed reference latents, in reference order
    txt_ids: torch.Tensor  # (T, 3)
    img_ids: torch.Tensor  # (N + sum n_i, 3): noisy grid, then each reference
    noisy_grid: GridSize  # packed grid of the noisy latents
    layout: TokenLayout
    item_spans: tuple[tuple[int, int], ...] | None
    # Per-sample phrase spans (one tuple of spans per sample) for routing-map capture, whose maps are per
    # sample; None: item_spans for every sample. Position ids and dynamic routing use item_spans only.
    sample_item_spans: tuple[tuple[tuple[int, int], ...], ...] | None = None


@dataclass(frozen=True)
class AttentionSwitches:
    """Per-call attention features (all off: the stock FLUX attention). ``capture_method="full"`` is the
    naive capture that materializes the whole attention matrix: a baseline for tests and benchmarks."""

    capture: bool = False
    capture_method: CaptureMethod = "chunked"
    static_routing: bool = False
    dynamic_routing: bool = False
    temperature: bool = False
    capture_routing: bool = False  # prompt routing maps of every double block (needs item phrases)


class PolicyOutput(NamedTuple):
    velocity: torch.Tensor  # (B, C, h, w) fp32, v = eps - x0 on the noisy latents only
    attention_maps: torch.Tensor | None  # (B, R, N) in [0, 1], mean over double blocks, normalized
    router: tuple[RouterRecord, ...]  # one per MoE-LoRA layer, in call order
    routing_maps: torch.Tensor | None = None  # (B, K, R, N) in [0, 1], one map per double block k (prompt_routing_maps)


class PolicyVelocity:
    """The samplers' velocity contract, (x_t (B, ...) fp32, sigma (B,) fp32) -> v (B, ...), with the
    conditioning and attention switches bound."""

    def __init__(self, policy: "FluxPolicy", conditioning: Conditioning, switches: AttentionSwitches = AttentionSwitches()):
        self.policy, self.conditioning, self.switches = policy, conditioning, switches
        self._experts: list[torch.Tensor] = []  # each MoE-LoRA layer's chosen experts in the last call

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.policy(x_t, sigma, self.conditioning, self.switches)
        self._experts = [r.experts for r in out.router]
        return out.velocity

    @property
    def last_experts(self) -> torch.Tensor | None:
        """MoE-LoRA: the top-1 expert of every routed token in the last call, (B, R) int16 with the layers'
        tokens concatenated in call order; None without MoE-LoRA. Built only when asked for."""
        return torch.cat([e[..., 0] for e in self._experts], dim=1).to(torch.int16) if self._experts else None


class FluxPolicy(torch.nn.Module):
    """A FLUX transformer with reference images in context, its latent codec and text encoders (all
    frozen), the policy attention processor in every block, and the configured adapters (the only
    trainable parameters). Build it with ``FluxPolicy.from_config``."""

    def __init__(self, components: FluxComponents, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = components.transformer
        self.codec = components.codec
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer = components.tokenizer
        self.tokenizer_2 = components.tokenizer_2
        self.t5_max_length = components.t5_max_length
        self.forward_context = ForwardContext()
        self.requires_grad_(False)  # base weights frozen; adapters below create trainable parameters
        with torch.random.fork_rng(devices=[]):  # adapter init under its own seed, global RNG untouched
            torch.manual_seed(cfg.adapter_seed)
            self._install_processors()
            if cfg.lora.enabled:
                self.transformer.add_adapter(peft_lora_config(cfg.lora), adapter_name=PEFT_ADAPTER_NAME)
                cast_adapter_dtype(self.transformer, PEFT_ADAPTER_NAME)  # LoRA trains in fp32 on a bf16 model
                for module in self.transformer.modules():  # peft froze every non-LoRA parameter, these included
                    if isinstance(module, TemperatureMLP):
                        module.requires_grad_(True)
            if cfg.moe_lora.enabled:
                install_moe_lora(self.transformer, cfg.moe_lora, self.forward_context)
            if cfg.dual_branch.enabled:
                install_dual_branch_lora(self.transformer, cfg.dual_branch, self.forward_context)

    @classmethod
    def from_config(cls, cfg: PolicyConfig) -> "FluxPolicy":
        dtype = getattr(torch, cfg.dtype)
        if cfg.source == "local":
            return cls(load_local_components(cfg.path, dtype=dtype), cfg)
        components = build_tiny_components(cfg.tiny)
        for model in (components.transformer, components.text_encoder, components.text_encoder_2):
            # plain Module.to: diffusers' override only warns about modules to keep in fp32, FLUX has none
            torch.nn.Module.to(model, dtype)
        return cls(components, cfg)

    def _install_processors(self) -> None:
        attention = self.cfg.attention
        inner_dim = self.transformer.inner_dim

        def temperature() -> TemperatureMLP | None:
            return TemperatureMLP(inner_dim, attention.temperature_hidden, attention.temperature_min) if attention.temperature else None

        for block in self.transformer.transformer_blocks:
            block.attn.set_processor(PolicyAttnProcessor(double_block=True, temperature=temperature()))
        for block in self.transformer.single_transformer_blocks:
            block.attn.set_processor(PolicyAttnProcessor(double_block=False, temperature=temperature()))

    # ---- shapes and data ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """One sample's (C, h, w) latent shape for an image of height x width pixels."""
        factor = self.codec.scale_factor
        if height % (2 * factor) or width % (2 * factor):
            raise ValueError(f"image size {height}x{width} must be a multiple of {2 * factor} (codec factor x 2x2 packing)")
        return self.codec.latent_channels, height // factor, width // factor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> latents (B, C, H/f, W/f) fp32."""
        return self.codec.encode_images(images.to(self.device) * 2 - 1).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, 3, h f, w f) in [0, 1] fp32."""
        return ((self.codec.decode_latents(latents).float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        item_phrases: Sequence[str] | None = None,
        condition_captions: Sequence[Sequence[str]] | None = None,
    ) -> PromptEmbeds:
        """T5 token embeddings and the CLIP pooled embedding (as FluxPipeline.encode_prompt). With
        ``item_phrases`` (one per reference, each a substring of every prompt), also the T5-token span of
        each phrase, which must be the same for every prompt of the batch. ``condition_captions`` (per
        prompt, each reference's caption) are used when the policy has per-condition prompts
        (``cfg.condition_prompts``): each caption's own T5 tokens are appended after its prompt's."""
        prompts = list(prompts)
        clip = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        pooled = self.text_encoder(clip.input_ids.to(self.device)).pooler_output
        embeds = self._t5_embeddings(prompts, self.t5_max_length)
        spans = None
        if item_phrases is not None:
            per_prompt = [self.item_spans(p, item_phrases) for p in prompts]
            if any(s != per_prompt[0] for s in per_prompt):
                raise ValueError(f"item phrases fall on different prompt tokens across the batch: {per_prompt}")
            spans = per_prompt[0]
        caption_tokens: tuple[int, ...] = ()
        if self.cfg.condition_prompts.enabled:
            embeds, caption_tokens = self._append_condition_captions(embeds, prompts, condition_captions)
        return PromptEmbeds(embeds.float(), pooled.float(), spans, caption_tokens)

    def _t5_embeddings(self, texts: list[str], length: int) -> torch.Tensor:
        # texts (B,) -> (B, length, D): each text padded or cut to length T5 tokens
        t5 = self.tokenizer_2(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return self.text_encoder_2(t5.input_ids.to(self.device)).last_hidden_state

    def _append_condition_captions(
        self, embeds: torch.Tensor, prompts: list[str], captions: Sequence[Sequence[str]] | None
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """MUSAR's CT^i: (B, T, D) prompt tokens -> (B, T + R m', D) with each sample's R captions encoded one by one."""
        if captions is None or len(captions) != len(prompts):
            raise ValueError(f"policy.condition_prompts is on: give each of the {len(prompts)} prompt(s) its references' captions (condition_captions)")
        counts = {len(c) for c in captions}
        if len(counts) != 1:
            raise ValueError(f"every prompt of a batch needs the same number of condition captions, got {sorted(counts)}")
        references, length = counts.pop(), self.cfg.condition_prompts.tokens
        if not references:
            return embeds, ()
        encoded = self._t5_embeddings([c for sample in captions for c in sample], length)  # (B R, m', D)
        encoded = encoded.reshape(len(prompts), references * length, encoded.shape[-1])
        return torch.cat([embeds, encoded.to(embeds.dtype)], dim=1), (length,) * references

    def item_spans(self, prompt: str, item_phrases: Sequence[str]) -> tuple[tuple[int, int], ...]:
        """The [start, end) T5-token span of each phrase's first occurrence in the prompt (samples whose
        spans are equal can share one conditioning)."""
        t5 = self.tokenizer_2([prompt], max_length=self.t5_max_length, truncation=True, return_offsets_mapping=True)
        return _phrase_token_spans(prompt, item_phrases, [list(o) for o in t5["offset_mapping"][0]])

    def condition_ids(self, categories: Sequence[str]) -> tuple[int, ...]:
        """One-for-All condition ids of references of these categories (cfg.condition_categories)."""
        known = self.cfg.condition_categories
        unknown = sorted(set(categories) - set(known))
        if unknown:
            raise ValueError(f"categories {unknown} have no condition id; policy.condition_categories is {list(known)}")
        return tuple(known.index(c) + 1 for c in categories)

    def condition(
        self,
        prompts: PromptEmbeds,
        references: Sequence[torch.Tensor],
        height: int,
        width: int,
        condition_ids: Sequence[int] | None = None,
    ) -> Conditioning:
        """Encode the reference images (each (B or 1, 3, h_i, w_i) in [0, 1]), pack them and build the
        position ids of the configured scheme for a target of height x width pixels."""
        _, lh, lw = self.latent_shape(height, width)
        noisy_grid = (lh // 2, lw // 2)
        for image in references:
            self.latent_shape(image.shape[-2], image.shape[-1])  # checks the size
        if self.cfg.condition_prompts.enabled and len(prompts.caption_tokens) != len(references):
            raise ValueError(f"{len(references)} references but the prompts carry {len(prompts.caption_tokens)} condition captions")
        sizes = {image.shape[0] for image in references} | {prompts.prompt_embeds.shape[0]}
        if len(sizes - {1}) > 1:
            raise ValueError(f"prompt and reference batch sizes must be 1 or one common size, got {sorted(sizes)}")
        batch = max(sizes)
        with torch.no_grad():
            latents = [self.encode_images(image) for image in references]
        tokens = [_expand_batch(pack_latents(z), batch) for z in latents]
        grids = [(z.shape[-2] // 2, z.shape[-1] // 2) for z in latents]
        scheme = self.cfg.position_scheme
        ref_ids = reference_ids(scheme, noisy_grid, grids, condition_ids)
        if scheme == "condition_id" and prompts.item_spans is None:
            raise ValueError("position scheme 'condition_id' needs item_phrases when encoding the prompts")
        txt = text_ids(scheme, prompts.prompt_embeds.shape[1], prompts.item_spans, ref_ids)
        img = torch.cat([grid_ids(noisy_grid), *ref_ids], dim=0)
        reference_tokens = torch.cat(tokens, dim=1) if tokens else prompts.prompt_embeds.new_zeros(1, 0, 4 * self.codec.latent_channels)
        layout = TokenLayout(prompts.prompt_embeds.shape[1], noisy_grid[0] * noisy_grid[1], tuple(t.shape[1] for t in tokens), prompts.caption_tokens)
        device = self.device
        return Conditioning(
            prompts.prompt_embeds.to(device), prompts.pooled_prompt_embeds.to(device), reference_tokens.to(device),
            txt.to(device), img.to(device), noisy_grid, layout, prompts.item_spans,
        )

    # ---- the model call -------------------------------------------------------------------------------

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, conditioning: Conditioning, switches: AttentionSwitches = AttentionSwitches()) -> PolicyOutput:
        """x_t (B, C, h, w), sigma (B,) -> PolicyOutput. Samples never interact (ids are shared, masks,
        routing and maps are per sample), so a sample's output does not depend on the rest of its batch
        (tested to 1e-5 in fp32): the RL ratio is 1 before the first update."""
        batch = x_t.shape[0]
        dtype = self.transformer.dtype
        noisy = pack_latents(x_t.to(self.device))
        layout = conditioning.layout
        if noisy.shape[1] != layout.noisy:
            raise ValueError(f"latents pack to {noisy.shape[1]} tokens but the conditioning was built for {layout.noisy}")
        hidden = torch.cat([noisy.to(dtype), _expand_batch(conditioning.reference_tokens, batch).to(dtype)], dim=1)
        control = AttentionControl(
            layout,
            capture=switches.capture,
            capture_method=switches.capture_method,
            capture_chunk_rows=self.cfg.attention.capture_chunk_rows,
            static_routing=switches.static_routing,
            dynamic_routing=switches.dynamic_routing,
            temperature=switches.temperature,
            capture_routing=switches.capture_routing,
            prompt_spans=conditioning.item_spans,
            routing_spans=conditioning.sample_item_spans,
        )
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.cfg.guidance_scale, device=self.device, dtype=torch.float32)
        with self.forward_context.bound(layout) as router:
            out = self.transformer(
                hidden_states=hidden,
                encoder_hidden_states=_expand_batch(conditioning.prompt_embeds, batch).to(dtype),
                pooled_projections=_expand_batch(conditioning.pooled_prompt_embeds, batch).to(dtype),
                timestep=sigma.to(self.device, dtype),  # FLUX takes timestep = sigma in [0, 1]
                img_ids=conditioning.img_ids,
                txt_ids=conditioning.txt_ids,
                guidance=guidance,
                joint_attention_kwargs={"attention_control": control},
            ).sample
        velocity = unpack_latents(out[:, : layout.noisy].float(), conditioning.noisy_grid)
        maps = normalize_maps(torch.stack(control.captured).mean(dim=0)) if switches.capture and control.captured else None
        routing = torch.stack(control.routing_maps, dim=1) if control.routing_maps else None
        return PolicyOutput(velocity, maps, tuple(router), routing)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model: LoRA, MoE-LoRA and dual-branch LoRA switched off (the reference policy of
        a KL term). Attention temperature is a per-call switch and stays as the caller sets it."""
        custom = [m for m in self.transformer.modules() if isinstance(m, (MoELoRALinear, DualBranchLoRALinear))]
        if self.cfg.lora.enabled:
            self.transformer.disable_adapters()
        for module in custom:
            module.adapter_enabled = False
        try:
            yield
        finally:
            if self.cfg.lora.enabled:
                self.transformer.enable_adapters()
            for module in custom:
                module.adapter_enabled = True

    @property
    def attention_mode(self) -> AttentionSwitches:
        """The switches every call of this policy runs with (``PolicyConfig.attention``): temperature,
        static and dynamic routing; per-call extras such as map capture add to them."""
        attention = self.cfg.attention
        return AttentionSwitches(static_routing=attention.static_routing, dynamic_routing=attention.dynamic_routing, temperature=attention.temperature)

    @property
    def needs_item_phrases(self) -> bool:
        """Whether conditioning must locate each reference's caption in the prompt: condition-id
        positions place the phrases, dynamic routing scores them."""
        return self.cfg.position_scheme == "condition_id" or self.cfg.attention.dynamic_routing

    def velocity_fn(self, conditioning: Conditioning, switches: AttentionSwitches | None = None) -> PolicyVelocity:
        """The velocity with ``switches``; by default the policy's attention mode."""
        return PolicyVelocity(self, conditioning, self.attention_mode if switches is None else switches)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---- training at scale ----------------------------------------------------------------------------

    def shard_transformer(self) -> None:
        """Shard the transformer's parameters over the data-parallel processes with FSDP2 (``fully_shard``
        on every block, then on the transformer): each rank keeps 1/world of the frozen base, of the
        adapters, of their gradients and so of the optimizer states built afterwards. Each block's
        parameters are gathered for its forward and its backward and freed after them. Every parameter
        keeps its dtype (a bf16 base, fp32 adapters), so a sharded forward runs the same kernels on the
        same values as an unsharded one. Gradients are summed over ranks, not averaged: the learner
        already weights each chunk by its share of all ranks' samples. Needs the default process group;
        from then on every rank must make the same transformer calls (forward, backward, adapter_state).
        The text encoders and the codec stay whole on every rank."""
        blocks = [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]
        for module in [*blocks, self.transformer]:
            fully_shard(module)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum

    def enable_block_checkpointing(self) -> None:
        """Keep only each transformer block's inputs for backward and recompute the block then (diffusers'
        gradient checkpointing, non-reentrant), with the adapters' forward context re-bound in the recompute
        (dual-branch LoRA reads the layout; MoE-LoRA records its routing once, in the forward)."""
        context_fn = self.forward_context.checkpoint_contexts

        def checkpointed(block: torch.nn.Module, *args):
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=context_fn)

        self.transformer.enable_gradient_checkpointing(checkpointed)

    # ---- adapters on disk -----------------------------------------------------------------------------

    def _adapter_description(self) -> dict:
        return {
            "format": ADAPTER_FORMAT,
            "lora": dataclasses.asdict(self.cfg.lora),
            "moe_lora": dataclasses.asdict(self.cfg.moe_lora),
            "dual_branch": dataclasses.asdict(self.cfg.dual_branch),
            "attention_temperature": self.cfg.attention.temperature,
            "static_routing": self.cfg.attention.static_routing,
            "condition_prompts": dataclasses.asdict(self.cfg.condition_prompts),
        }

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor, trainable or frozen (a frozen MoE gate from warm-start adapters too),
        detached copies on the CPU, named as in save_adapters' files: plain LoRA as in diffusers' LoRA file
        (``transformer.`` + peft's name), the others as in policy_adapters.safetensors. The one format of
        adapter files, checkpoints and the weights rollout workers receive after each update.
        With a sharded transformer each tensor is gathered whole: every rank must call this together."""
        return {name: full_tensor(tensor).detach().cpu().clone() for name, tensor in self._live_adapter_tensors().items()}

    def _live_adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter tensors in place (shards when the transformer is sharded), named as adapter_state."""
        state = {}
        if self.cfg.lora.enabled:
            lora = get_peft_model_state_dict(self.transformer, adapter_name=PEFT_ADAPTER_NAME)
            state.update({f"{LORA_KEY_PREFIX}{name}": tensor for name, tensor in lora.items()})
        state.update(custom_adapter_state(self.transformer))
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor], source: str = "adapter state") -> None:
        """Copy ``adapter_state()`` output (of a policy with the same adapter config) into this policy
        (into each rank's shard when the transformer is sharded; no communication)."""
        live = self._live_adapter_tensors()
        if set(state) != set(live):
            missing, extra = sorted(set(live) - set(state)), sorted(set(state) - set(live))
            raise ValueError(f"{source} does not fit this policy: missing {missing[:3]}, unexpected {extra[:3]}")
        placed = {name: placed_like(state[name], tensor) for name, tensor in live.items()}
        if self.cfg.lora.enabled:
            lora = {name.removeprefix(LORA_KEY_PREFIX): tensor for name, tensor in placed.items() if name.startswith(LORA_KEY_PREFIX)}
            set_peft_model_state_dict(self.transformer, lora, adapter_name=PEFT_ADAPTER_NAME)
        with torch.no_grad():
            for name, tensor in custom_adapter_state(self.transformer).items():
                tensor.copy_(placed[name])

    def save_adapters(self, folder: str | Path) -> None:
        """Write the adapters: plain LoRA in diffusers' format (FluxPipeline.load_lora_weights(folder)
        reads it), the other adapters to policy_adapters.safetensors, and adapter_config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.adapter_state()
        if self.cfg.lora.enabled:
            FluxPipeline.save_lora_weights(
                folder,
                transformer_lora_layers={k.removeprefix(LORA_KEY_PREFIX): v for k, v in state.items() if k.startswith(LORA_KEY_PREFIX)},
                weight_name=LORA_WEIGHTS_FILE,
                transformer_lora_adapter_metadata=self.transformer.peft_config[PEFT_ADAPTER_NAME].to_dict(),
            )
        custom = {k: v.contiguous() for k, v in state.items() if not k.startswith(LORA_KEY_PREFIX)}
        if custom:
            save_file(custom, str(folder / CUSTOM_WEIGHTS_FILE))
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(self._adapter_description(), indent=2, default=list))

    def load_adapters(self, folder: str | Path) -> None:
        """Load adapters saved by save_adapters into this policy, built with the same adapter config."""
        folder = Path(folder)
        config_file = folder / ADAPTER_CONFIG_FILE
        saved = read_adapter_description(folder)
        expected = json.loads(json.dumps(self._adapter_description(), default=list))
        for key in expected:
            if saved.get(key) != expected[key]:
                raise ValueError(f"{config_file}: '{key}' is {saved.get(key)!r} but this policy has {expected[key]!r}")
        state = {}
        for name in (LORA_WEIGHTS_FILE, CUSTOM_WEIGHTS_FILE):
            if (folder / name).is_file():
                state.update(load_file(str(folder / name)))
        self.load_adapter_state(state, source=f"the adapter files in {folder}")


def read_adapter_description(folder: str | Path) -> dict:
    """The adapter_config.json of an adapter folder written by ``FluxPolicy.save_adapters``."""
    config_file = Path(folder) / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"adapter folder {folder} has no {ADAPTER_CONFIG_FILE} (expected a folder written by FluxPolicy.save_adapters)")
    saved = json.loads(config_file.read_text())
    if saved.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{config_file}: format is {saved.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    # folders written before the attention mode and the conditioning were recorded had neither
    saved.setdefault("static_routing", False)
    saved.setdefault("condition_prompts", dataclasses.asdict(ConditionPromptConfig()))
    return saved


def with_adapters_of(cfg: PolicyConfig, folder: str | Path) -> PolicyConfig:
    """``cfg`` with the adapter layout, attention mode and conditioning that the adapter folder was saved
    with (LoRA, MoE-LoRA, dual-branch LoRA, temperature, static routing, per-condition prompts), so a bare
    base model can load them."""
    saved = read_adapter_description(folder)
    return dataclasses.replace(
        cfg,
        lora=dataclasses.replace(cfg.lora, **{k: tuple(v) if isinstance(v, list) else v for k, v in saved["lora"].items()}),
        moe_lora=dataclasses.replace(cfg.moe_lora, **saved["moe_lora"]),
        dual_branch=dataclasses.replace(cfg.dual_branch, **saved["dual_branch"]),
        attention=dataclasses.replace(cfg.attention, temperature=saved["attention_temperature"], static_routing=saved["static_routing"]),
        condition_prompts=ConditionPromptConfig(**saved["condition_prompts"]),
    )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective over its mesh), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def placed_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``value`` on ``like``'s device and dtype, and, when ``like`` is a DTensor, cut into
    this rank's shard of ``like``'s placement (every rank holds ``value``: no communication)."""
    value = value.to(like.device, like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


def _expand_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch-1 tensor broadcast to ``batch`` (conditioning shared by a group); any other batch must match."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] != 1:
        raise ValueError(f"conditioning has batch {tensor.shape[0]} but the latents have batch {batch}")
    return tensor.expand(batch, *tensor.shape[1:])


def _phrase_token_spans(prompt: str, phrases: Sequence[str], offsets: list[list[int]]) -> tuple[tuple[int, int], ...]:
    """[start, end) token span of each phrase's first occurrence in the prompt, from the tokenizer's
    character offsets (a token belongs to the phrase if its characters overlap it)."""
    spans = []
    lowered = prompt.lower()
    for phrase in phrases:
        begin = lowered.find(phrase.lower())
        if begin < 0:
            raise ValueError(f"item phrase {phrase!r} does not occur in the prompt {prompt!r}")
        end = begin + len(phrase)
        tokens = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > begin]
        if not tokens:
            raise ValueError(f"item phrase {phrase!r} was truncated away from the prompt {prompt!r}")
        spans.append((tokens[0], tokens[-1] + 1))
    return tuple(spans)
