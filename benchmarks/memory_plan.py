"""GPU memory plan of the paper presets: exact parameter counts on the meta device, a per-role memory model,
and that model checked against reduced-width models measured on the CPU.

    python benchmarks/memory_plan.py --config configs/ippo_multi_human.yaml
    python benchmarks/memory_plan.py --all                                # every IPPO and SFT paper preset
    python benchmarks/memory_plan.py --all --base-dtype bfloat16 --shard-adapters --no-validate
    python benchmarks/memory_plan.py --config configs/ippo_multi_human.yaml learner.sharding=replicate   # what-if

Parameters. The preset's policy is built as ``policies.FluxPolicy`` builds it (``FluxPolicy(components, cfg)``:
peft LoRA through ``transformer.add_adapter`` + ``cast_adapter_dtype``, ``install_moe_lora``,
``install_dual_branch_lora``, temperature MLPs), around a ``diffusers.FluxTransformer2DModel`` with FLUX.1-dev's
shapes constructed under ``torch.device("meta")``: no weights are allocated. Every parameter is counted and
classified by the module that owns it (base, or the adapter layer type). Per adapted linear the count is also
checked against the closed forms: LoRA r (d_in + d_out); MoE-LoRA N_e r (d_in + d_out) + N_e d_in (the gate,
no bias); dual-branch (r_noisy + r_condition)(d_in + d_out). The text encoders and the VAE are not part of the
transformer: their sizes are FLUX.1-dev's published component sizes (``FLUX_TEXT_ENCODERS``), which equal the
meta-device count of the published configs (T5-XXL encoder 4,762,310,656; CLIP-L text 123,060,480; VAE
83,819,683). Reward models: open_clip's ViT-L-14 and ViT-H-14 (meta-device count of open_clip's bundled
configs), the others from their published sizes (``REWARD_MODELS``).

Memory per GPU, in GiB (2^30 bytes), per worker role. P_base, P_ad (all adapter parameters), P_tr (trainable
adapter parameters), b = bytes of the base dtype (``policy.dtype`` unless --base-dtype), N = learners
(workers.learners; --sft-processes for the SFT presets):

- learner (IPPO) and SFT process
  weights          b P_base, / N with learner.sharding fsdp (FluxPolicy.shard_transformer) or --shard-base
  text enc. + VAE  b (P_T5 + P_CLIP + P_VAE): the code builds the whole FluxPolicy on every learner
                   (``FluxPolicy.from_config(cfg).to(device)``) and encodes prompts and references there
  adapters         4 P_ad (fp32 master: ``cast_adapter_dtype``; custom adapters are created in fp32), / N with
                   learner.sharding fsdp or --shard-adapters (FSDP2: parameters, gradients and optimizer states sharded)
  gradients        4 P_tr, / N when sharded
  AdamW states     8 P_tr (exp_avg + exp_avg_sq, fp32), / N when sharded
  FSDP gathers     when sharded, 2 (b base + 4 adapters) of the largest block (the one in use and the one
                   prefetched) + 4 trainable of that block (its whole gradients before the reduce-scatter),
                   alongside the activations
  activations      the autograd graph of one learner chunk: IPPO recomputes the window's W = sampler.window_size
                   steps of one rollout chunk (rollout.chunk_size samples) and back-propagates them together
                   (``rl_align.ippo.learner.policy_update``: one chunk's graph at a time, so the minibatch size
                   does not multiply it); SFT one forward of data.batch_size samples. Per forward and sample,
                   tokens L = text (512 T5 tokens + MUSAR caption tokens) + (H/16)(W/16) + sum_i (R/16)^2.
                   Without checkpointing: the sum over blocks of ``block_saved_bytes`` (below) plus the
                   outside-block terms. With block checkpointing (learner.checkpoint_blocks:
                   ``FluxPolicy.enable_block_checkpointing``, torch.utils.checkpoint per block): every block keeps only its inputs (b d L per
                   sample) plus the outside-block terms, and one block's full activations exist during its
                   recompute. A backward working set of half the largest block's activations (gradients of a
                   block's saved tensors coexist with them while it is back-propagated; measured 0.3-0.55 on
                   the CPU validation) is added in both columns.
  batch            one chunk's stored transitions (x_t, x_next fp32 per window step) and the conditioning
                   (T5 embeddings fp32, packed references)
  step transient   4 P_tr (/ N when sharded): the flat fp32 copy of all gradients that ``sum_gradients``
                   all-reduces, then AdamW's foreach temporaries (sqrt(v) of every parameter); they come after
                   the backward, so peak = static + max(activations, step transient)
  CUDA context     CUDA_CONTEXT_GIB per process (an assumption: torch + CUDA context on Hopper, not measured)
- rollout worker: weights b P_base + adapters 4 P_ad (fp32, no gradients) + text encoders and VAE (b) +
  the larger of one transformer forward without grad at rollout.chunk_size (``inference_peak_bytes``) and the
  VAE decode of the chunk (``VAE_DECODE`` rough bound: 3 maps of 256 channels at full resolution) + context
- reward worker: the preset's reward models in fp32 (the code loads them so) + context; activations of a
  chunk of 224 px images through a ViT are under 0.1 GiB and are left out
- per GPU: with gpus_per_rollout_worker + gpus_per_learner + gpus_per_reward_worker <= 1, Ray packs one of each
  on a GPU and their sum is what one GPU holds; otherwise each role is packed alone, floor(1 / share) per GPU.
  A role with share 0 runs on the CPU and is not counted. The verdict compares with --gpu-gb (GiB).

``block_saved_bytes`` counts what autograd saves in a block for backward (frozen base linears save nothing:
their weight needs no gradient), per sample, d = width, h = heads, m = MLP width (4d), S = the stream's tokens:
- attention (both block kinds): q, k, v and the output saved by the fused kernel, b d each, plus the fp32
  log-sum-exp, 4 h, per token of L; QK RMSNorms: the fp32 input and rsqrt of q and k, 2 (4 d + 4 h) per token.
  With an fp32 base and one sample, the input of to_out.0 / to_add_out is a view of the saved attention output
- LayerNorm (norm1 and norm2 of each stream in double blocks; single blocks' norm): input b d + fp32 mean and
  rstd (8) per token; GELU: its input b m per token; AdaLN gates, scales and shifts (no gradient upstream;
  the saved chunks keep their whole emb storage): 16 b d per double block, 4 b d per single block
- plain LoRA (peft): lora_A keeps its input cast to fp32, 4 d_in S (each layer makes its own copy when the
  base is not fp32; with an fp32 base the layers reading one tensor share it: b d_in S once), lora_B keeps
  lora_A's output, 4 r S
- MoE-LoRA with sparse top-k dispatch (``moe_lora_delta``): the gate's fp32 input (as LoRA), routing
  bookkeeping 12 N_e + 32 k per token (softmax output, top-k mask, gathered weights; int64 indices), and per
  (token, chosen expert) the gathered input 4 d_in, the weight 4, down and weighted down 8 r, and the expert
  output kept by index_add_ 4 d_out. Dense MoE-LoRA (every expert computed, the older code; picked when
  ``policies.adapters`` has no ``moe_lora_delta``) keeps the input, 8 N_e r (down before and after
  weighting) and 12 N_e + 16 k of routing per token
- dual-branch LoRA: the fp32 input of the whole stream 4 d_in S (with a batch above 1 the branches' slices are
  not contiguous and F.linear copies them: 4 d_in per noisy and reference token, per layer), the noisy
  branch's down 4 r_noisy per noisy token, the condition branch's 4 r_condition per reference token
- attention temperature (One-for-All), per token of L: the division's query and temperature b d + b, the
  softplus input 4 and the GELU input 4 h_T; when the MLP is trainable also its fp32 input copy 4 d (unless
  b is 4) and its hidden output 4 h_T
- routing-map capture (AnyStory's routing stage): the fp32 softmax over the prompt, 4 h N T_prompt, plus fp32
  copies of the noisy queries and prompt keys 4 d (N + T_prompt) when b is not 4, per double block
- static routing (MUSAR diptych): the CUDA memory-efficient kernel keeps the additive mask it is given,
  b L^2 per block and forward (not exercised by the CPU validation: its kernel differs)
In the first double block the inputs of norm1 / norm1_context come from the frozen embedders and need no gradient:
its two norm1 LayerNorms save nothing, nor do the QK norms of a projection without an adapter.
Outside the blocks, per forward: RoPE cos and sin, 8 d_head L (shared by the batch); per sample the output
LayerNorm's input, b d L (a slice of the last single block's output, whose storage holds every token) + 8 per
image-stream token, and the log-prob head, 4 c_in N (c_in = 64 packed latent
channels, N noisy tokens). Map capture for IDAR saves nothing new (its queries and keys are views of the
attention's), and its fp32 chunks are transient.

``inference_peak_bytes`` (rollout, no grad): the widest moment of a single block, the MoE proj_out on the
(d + m) concatenation: residual and norm output 2 b d, the concatenation b (d + m), its fp32 copy and the
gathered rows 4 (d + m)(1 + k), and three fp32 d_out tensors (expert output, delta, sum) 12 d, per token.

Validation: the same code (FluxPolicy, peft, the adapters, ``window_log_probs``) at a reduced width (2 double +
2 single blocks, 4 heads of 32, adapter ranks scaled by the width ratio) and the preset's token counts, on the
CPU. Each case runs in a fresh subprocess (glibc's mmap threshold fixed at 64 KiB, so freed tensors leave the
resident set): it runs the step once to warm up, resets the peak RSS (/proc/self/clear_refs), runs it again
and reads VmHWM; it also tallies, with saved-tensor hooks, the bytes autograd saves (distinct storages, not
parameters). The table prints the model's prediction next to the tally and the measured peak increase.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: the packages live in the repository root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

import policies.adapters as adapters  # noqa: E402
from policies import FluxPolicy, PolicyConfig  # noqa: E402
from policies.adapters import DualBranchLoRALinear, MoELoRALinear  # noqa: E402
from policies.attention import TemperatureMLP  # noqa: E402
from policies.components import FluxComponents  # noqa: E402
from rl_align.core.config import load_config  # noqa: E402

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_BYTES = 4  # adapters train in fp32 (cast_adapter_dtype; the custom adapters are created in fp32)
T5_TOKENS = 512  # load_local_components: min(512, FLUX.1-dev tokenizer_2's model_max_length 512)
LATENT_CHANNELS = 16  # FLUX.1-dev's VAE; 2x2 packing gives in_channels 64
PIXELS_PER_TOKEN = 16  # VAE factor 8 x 2x2 packing
CUDA_CONTEXT_GIB = 0.5  # per process: torch + CUDA context on Hopper (an assumption, typically 0.4-0.6 GiB)

# FLUX.1-dev's transformer/config.json (FLUX.1-Kontext-dev's transformer has the same shapes).
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# FLUX.1-dev's published component sizes (parameters); each equals the meta-device count of the published config.
FLUX_TEXT_ENCODERS = {"T5-XXL encoder": 4_762_310_656, "CLIP-L text encoder": 123_060_480, "VAE (AutoencoderKL)": 83_819_683}
# Reward models (parameters): open_clip ViT-L-14 and ViT-H-14 (HPSv2) counted on the meta device from
# open_clip's bundled configs; insightface buffalo_l from its ONNX files (det_10g 16.9 MB, w600k_r50 174 MB in
# fp32); Florence-2-large, SAM2.1 hiera-large and DINOv2-base from their model cards.
REWARD_MODELS = {
    "clip": {"CLIP ViT-L/14 (R_clip)": 427_616_513},
    "hps": {"HPSv2 ViT-H-14 (R_hps)": 986_109_441},
    "face": {"insightface SCRFD-10G + ArcFace R50 (R_id)": 4_200_000 + 43_600_000},
    "object": {"Florence-2-large (R_id grounding)": 770_000_000, "SAM2.1 hiera-large (R_id masks)": 224_400_000,
               "DINOv2-base (R_id embeddings)": 86_600_000},
}
# Gradients of a block's saved tensors coexist with them while the block is back-propagated: measured on the CPU
# validation at 0.3-0.55 of the largest block's activations (peak minus saved-tensor tally); the model takes 0.5.
BACKWARD_WORKING_SET = 0.5
VAE_DECODE_MAPS, VAE_DECODE_CHANNELS = 3, 256  # rough bound of the decoder's peak: 3 maps of 256 channels at full size

IPPO_PRESETS = ("configs/ippo_multi_human.yaml", "configs/ippo_multi_object.yaml")
SFT_PRESETS = tuple(
    f"configs/sft/{name}.yaml"
    for name in ("multicrafter_single", "multicrafter_idar_human", "multicrafter_idar_object", "musar_diptych",
                 "one_for_all_position_id", "anystory_routing", "ms_customnet_coco")
)


# ---- shapes and building --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FluxShape:
    """The FluxTransformer2DModel constructor arguments that set the memory (diffusers' names)."""

    num_layers: int = 19
    num_single_layers: int = 38
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    in_channels: int = 64
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp(self) -> int:
        return 4 * self.width  # diffusers' FLUX blocks: mlp_ratio 4

    def kwargs(self) -> dict:
        return dict(patch_size=1, **dataclasses.asdict(self))


FLUX_DEV_SHAPE = FluxShape(**{k: v for k, v in FLUX_DEV.items() if k != "patch_size"})
# The validation's reduced width: FLUX-shaped, 2 double + 2 single blocks, 4 heads of 32.
REDUCED_SHAPE = FluxShape(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=32,
                          joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(4, 14, 14))


def build_policy(cfg: PolicyConfig, shape: FluxShape = FLUX_DEV_SHAPE, device: str = "meta", dtype: torch.dtype = torch.float32) -> FluxPolicy:
    """The policy FluxPolicy builds for ``cfg`` around a FLUX-shaped transformer, without text encoders or VAE.
    On the meta device nothing is allocated; on the CPU it is a real random-init model."""
    with torch.device(device):
        transformer = FluxTransformer2DModel(**shape.kwargs()).eval()
        torch.nn.Module.to(transformer, dtype)  # as FluxPolicy.from_config: plain Module.to
        components = FluxComponents(transformer=transformer, codec=None, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, t5_max_length=T5_TOKENS)
        return FluxPolicy(components, cfg)


def scaled_policy(cfg: PolicyConfig, shape: FluxShape) -> PolicyConfig:
    """``cfg`` with its adapter ranks scaled by shape's width / FLUX.1-dev's (the validation's reduced models)."""
    ratio = shape.width / FLUX_DEV_SHAPE.width

    def rank(r: int) -> int:
        return max(2, round(r * ratio))

    return dataclasses.replace(
        cfg,
        lora=dataclasses.replace(cfg.lora, rank=rank(cfg.lora.rank), alpha=float(rank(cfg.lora.rank))),
        moe_lora=dataclasses.replace(cfg.moe_lora, rank=rank(cfg.moe_lora.rank), alpha=float(rank(cfg.moe_lora.rank))),
        dual_branch=dataclasses.replace(cfg.dual_branch, noisy_rank=rank(cfg.dual_branch.noisy_rank), condition_rank=rank(cfg.dual_branch.condition_rank)),
    )


# ---- parameters -------------------------------------------------------------------------------------------


def lora_params(d_in: int, d_out: int, rank: int) -> int:
    """Plain LoRA on a d_in -> d_out linear: A (r, d_in) + B (d_out, r)."""
    return rank * (d_in + d_out)


def moe_lora_params(d_in: int, d_out: int, rank: int, experts: int) -> int:
    """MoE-LoRA: N_e experts of rank r plus the gate (d_in -> N_e, no bias)."""
    return experts * lora_params(d_in, d_out, rank) + experts * d_in


@dataclass(frozen=True)
class AdaptedLinear:
    """One adapted linear of the transformer, as installed, with what the activation model needs."""

    path: str
    kind: str  # "lora" | "moe" | "dual"
    block: str  # "double" | "single" | "other"
    stream: str  # "image" (double blocks' noisy + references), "text", or "joint" (single blocks: text + image)
    input_key: str  # layers with the same key read the same tensor
    group: str  # the layer type it is counted under
    d_in: int
    d_out: int
    rank: int  # LoRA / MoE expert rank; dual-branch: the noisy rank
    experts: int = 0
    top_k: int = 0
    condition_rank: int = 0
    params: int = 0  # counted
    trainable: int = 0  # counted, requires_grad
    gate_params: int = 0  # MoE: counted gate parameters (included in params)

    @property
    def formula_params(self) -> int:
        if self.kind == "lora":
            return lora_params(self.d_in, self.d_out, self.rank)
        if self.kind == "moe":
            return moe_lora_params(self.d_in, self.d_out, self.rank, self.experts)
        return lora_params(self.d_in, self.d_out, self.rank) + lora_params(self.d_in, self.d_out, self.condition_rank)


# the tensor a layer reads inside its block (layers reading one tensor share it)
_DOUBLE_INPUTS = {
    "attn.to_q": ("image", "norm1"), "attn.to_k": ("image", "norm1"), "attn.to_v": ("image", "norm1"),
    "attn.to_out.0": ("image", "attention output"),
    "attn.add_q_proj": ("text", "norm1_context"), "attn.add_k_proj": ("text", "norm1_context"), "attn.add_v_proj": ("text", "norm1_context"),
    "attn.to_add_out": ("text", "context attention output"),
    "ff.net.0.proj": ("image", "norm2"), "ff.net.2": ("image", "ff hidden"),
    "ff_context.net.0.proj": ("text", "norm2_context"), "ff_context.net.2": ("text", "ff_context hidden"),
}
_SINGLE_INPUTS = {
    "attn.to_q": ("joint", "norm"), "attn.to_k": ("joint", "norm"), "attn.to_v": ("joint", "norm"), "proj_mlp": ("joint", "norm"),
    "proj_out": ("joint", "attention + mlp"),
}


def _locate(path: str) -> tuple[str, str, str, str]:
    """block kind, block id, stream, input key of a module path."""
    parts = path.split(".")
    if parts[0] == "transformer_blocks":
        stream, key = _DOUBLE_INPUTS.get(".".join(parts[2:]), ("text" if "context" in path or ".add_" in path else "image", path))
        return "double", ".".join(parts[:2]), stream, key
    if parts[0] == "single_transformer_blocks":
        stream, key = _SINGLE_INPUTS.get(".".join(parts[2:]), ("joint", path))
        return "single", ".".join(parts[:2]), stream, key
    return "other", "", "text" if parts[0] == "context_embedder" else "image", path


def _group(kind: str, block: str, local: str) -> str:
    where = {"double": "double blocks", "single": "single blocks", "other": "outside blocks"}[block]
    if kind == "lora":
        if local.startswith("attn."):
            return f"LoRA attention projections ({where})"
        if local.endswith("net.0.proj"):
            return "LoRA FFN input ff.net.0.proj + ff_context.net.0.proj"
        if local == "proj_mlp":
            return "LoRA single blocks' proj_mlp"
        return f"LoRA {local} ({where})"
    if kind == "moe":
        return {"ff.net.2": "MoE-LoRA experts on ff.net.2", "ff_context.net.2": "MoE-LoRA experts on ff_context.net.2"}.get(
            local, "MoE-LoRA experts on single blocks' proj_out" if block == "single" else f"MoE-LoRA experts on {local}")
    return f"dual-branch LoRA ({where})"


def adapted_linears(policy: FluxPolicy) -> list[AdaptedLinear]:
    """Every adapted linear of the policy's transformer, in module order."""
    found = []
    for path, module in policy.transformer.named_modules():
        block, block_id, stream, key = _locate(path)
        local = path[len(block_id) + 1:] if block_id else path
        key = f"{block_id}/{key}"
        if isinstance(module, LoraLayer):
            params = [p for name, p in module.named_parameters() if name.startswith("lora_")]
            (adapter,) = module.r
            found.append(AdaptedLinear(path, "lora", block, stream, key, _group("lora", block, local), module.in_features, module.out_features,
                                       module.r[adapter], params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad)))
        elif isinstance(module, MoELoRALinear):
            params = list(module.adapter_parameters().values())
            experts, rank, _ = module.lora_A.shape
            found.append(AdaptedLinear(path, "moe", block, stream, key, _group("moe", block, local), module.base.in_features, module.base.out_features,
                                       rank, experts=experts, top_k=module.top_k, params=sum(p.numel() for p in params),
                                       trainable=sum(p.numel() for p in params if p.requires_grad), gate_params=module.gate.weight.numel()))
        elif isinstance(module, DualBranchLoRALinear):
            params = list(module.adapter_parameters().values())
            found.append(AdaptedLinear(path, "dual", block, stream, key, _group("dual", block, local), module.base.in_features, module.base.out_features,
                                       module.noisy_A.shape[0], condition_rank=module.condition_A.shape[0], params=sum(p.numel() for p in params),
                                       trainable=sum(p.numel() for p in params if p.requires_grad)))
    return found


@dataclass
class GroupCount:
    layers: int = 0
    params: int = 0
    formula: int = 0
    trainable: int = 0


@dataclass
class ParamCount:
    base: int
    adapters: int
    trainable: int
    groups: dict[str, GroupCount]
    linears: list[AdaptedLinear]
    temperature_hidden: int = 0  # One-for-All: width of the temperature MLPs (0: none)
    # the block with the most parameters (a double block): (base, adapters, trainable adapters)
    largest_block: tuple[int, int, int] = (0, 0, 0)

    @property
    def temperature_trainable(self) -> bool:
        group = self.groups.get("attention temperature MLPs")
        return bool(group and group.trainable)

    def layers_of(self, kind: str) -> int:
        return sum(1 for linear in self.linears if linear.kind == kind)


def count_parameters(policy: FluxPolicy) -> ParamCount:
    """Exact base and adapter parameter counts, the adapters by layer type (MoE gates apart from the experts)."""
    linears = adapted_linears(policy)
    groups: dict[str, GroupCount] = {}
    for linear in linears:
        experts = groups.setdefault(linear.group, GroupCount())
        experts.layers += 1
        experts.params += linear.params - linear.gate_params
        experts.formula += linear.formula_params - (linear.experts * linear.d_in if linear.kind == "moe" else 0)
        experts.trainable += linear.trainable - (linear.gate_params if linear.trainable == linear.params else 0)
        if linear.kind == "moe":
            gates = groups.setdefault("MoE-LoRA gates (all MoE layers)", GroupCount())
            gates.layers += 1
            gates.params += linear.gate_params
            gates.formula += linear.experts * linear.d_in
            gates.trainable += linear.gate_params if linear.trainable == linear.params else 0
    adapter_ids = set()
    for module in policy.transformer.modules():
        if isinstance(module, LoraLayer):
            adapter_ids |= {id(p) for name, p in module.named_parameters() if name.startswith("lora_")}
        elif isinstance(module, (MoELoRALinear, DualBranchLoRALinear)):
            adapter_ids |= {id(p) for p in module.adapter_parameters().values()}
    hidden = 0
    temperature = GroupCount()
    for module in policy.transformer.modules():
        if isinstance(module, TemperatureMLP):
            params = list(module.parameters())
            adapter_ids |= {id(p) for p in params}
            temperature.layers += 1
            temperature.params += sum(p.numel() for p in params)
            temperature.formula += lora_params(module.hidden.in_features, 1, module.hidden.out_features) + module.hidden.out_features + 1
            temperature.trainable += sum(p.numel() for p in params if p.requires_grad)
            hidden = module.hidden.out_features
    if temperature.layers:
        groups["attention temperature MLPs"] = temperature
    everything = list(policy.transformer.parameters())
    adapter_params = [p for p in everything if id(p) in adapter_ids]

    def block_count(block: torch.nn.Module) -> tuple[int, int, int]:
        params = list(block.parameters())
        adapters = [p for p in params if id(p) in adapter_ids]
        return (sum(p.numel() for p in params if id(p) not in adapter_ids), sum(p.numel() for p in adapters),
                sum(p.numel() for p in adapters if p.requires_grad))

    blocks = [*policy.transformer.transformer_blocks, *policy.transformer.single_transformer_blocks]
    return ParamCount(
        base=sum(p.numel() for p in everything if id(p) not in adapter_ids),
        adapters=sum(p.numel() for p in adapter_params),
        trainable=sum(p.numel() for p in adapter_params if p.requires_grad),
        groups=groups, linears=linears, temperature_hidden=hidden,
        largest_block=max((block_count(block) for block in blocks), key=lambda c: c[0] + c[1], default=(0, 0, 0)),
    )


# ---- tokens and the activation model ------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    text: int  # the text stream: prompt + any condition captions
    noisy: int
    references: tuple[int, ...]
    prompt: int = T5_TOKENS  # the target prompt's tokens (routing maps compare against them)

    @property
    def image(self) -> int:
        return self.noisy + sum(self.references)

    @property
    def total(self) -> int:
        return self.text + self.image

    @classmethod
    def of(cls, height: int, width: int, reference_size: int, references: int, text: int = T5_TOKENS, caption_tokens: int = 0) -> "Tokens":
        side = reference_size // PIXELS_PER_TOKEN
        return cls(text + references * caption_tokens, (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN), (side * side,) * references, text)


@dataclass(frozen=True)
class Features:
    """What a model call does besides the stock forward (the attention switches that change memory)."""

    temperature: bool = False
    routing_capture: bool = False
    static_routing: bool = False
    moe_sparse: bool = True  # sparse top-k dispatch (policies.adapters.moe_lora_delta) vs dense experts
    temperature_trainable: bool = True  # False: the temperature MLPs are frozen (their inputs are not saved)


def moe_is_sparse() -> bool:
    """Whether the installed MoE-LoRA computes only the chosen experts (the sparse dispatch of moe_lora_delta)."""
    return hasattr(adapters, "moe_lora_delta")


def _stream_tokens(stream: str, tokens: Tokens) -> int:
    return {"image": tokens.image, "text": tokens.text, "joint": tokens.total}[stream]


# double-block inputs that, with an fp32 base and one sample, are views of the attention output the kernel saved
_ATTENTION_OUTPUTS = ("attention output", "context attention output")


def adapter_saved_bytes(linears: Sequence[AdaptedLinear], tokens: Tokens, base_bytes: int, moe_sparse: bool = True, batch: int = 1) -> float:
    """Bytes the adapters of one block save, per sample (see the module docstring)."""
    total = 0.0
    shared_inputs = set()
    for linear in linears:
        s = _stream_tokens(linear.stream, tokens)
        own = s
        if linear.kind == "dual" and batch > 1:
            own = tokens.image  # the branches' slices are not contiguous: F.linear copies them (no text part)
        if base_bytes == ADAPTER_BYTES and (linear.kind != "dual" or batch == 1):
            # the fp32 cast is a no-op: layers reading one tensor save it once, a view of the attention's output not at all
            if linear.input_key not in shared_inputs:
                shared_inputs.add(linear.input_key)
                if not (batch == 1 and linear.input_key.split("/")[-1] in _ATTENTION_OUTPUTS):
                    total += base_bytes * linear.d_in * s
        else:
            total += ADAPTER_BYTES * linear.d_in * own  # each layer's own fp32 copy of its input
        if linear.kind == "lora":
            total += 4 * linear.rank * s
        elif linear.kind == "moe":
            e, k, r = linear.experts, linear.top_k, linear.rank
            if moe_sparse:
                total += s * (12 * e + 32 * k) + s * k * (4 * linear.d_in + 4 + 8 * r + 4 * linear.d_out)
            else:
                total += s * (12 * e + 16 * k) + s * 8 * e * r
        else:  # dual-branch: the noisy branch on the noisy tokens, the condition branch on the references
            total += 4 * linear.rank * tokens.noisy + 4 * linear.condition_rank * sum(tokens.references)
    return total


def block_saved_bytes(kind: str, shape: FluxShape, tokens: Tokens, base_bytes: int, linears: Sequence[AdaptedLinear] = (),
                      features: Features = Features(), temperature_hidden: int = 16, batch: int = 1, first: bool = False) -> dict[str, float]:
    """Bytes autograd saves in one double or single block for one sample, by term (see the module docstring).
    The static-routing mask (per forward, not per sample) is returned under its own key."""
    b, d, h, m = base_bytes, shape.width, shape.num_attention_heads, shape.mlp
    length, streams = tokens.total, (tokens.image + tokens.text)
    qk_tokens = 2 * length
    if first:  # the first block's QK-norm inputs need a gradient only where the q / k projection is adapted
        adapted = {linear.path.rsplit(".", 1)[-1] for linear in linears}
        qk_tokens = sum(tokens.image for name in ("to_q", "to_k") if name in adapted) + sum(
            tokens.text for name in ("add_q_proj", "add_k_proj") if name in adapted)
    terms = {
        "attention": (4 * b * d + 4 * h) * length,
        "qk norms": (4 * d + 4 * h) * qk_tokens,
        # double blocks: norm1 and norm2 per stream; the first block's norm1 inputs need no gradient (frozen embedders)
        "layer norms": (b * d + 8) * ((1 if first else 2) * streams if kind == "double" else length),
        "gelu": b * m * (streams if kind == "double" else length),
        "modulation": (16 if kind == "double" else 4) * b * d,
        "adapters": adapter_saved_bytes(linears, tokens, base_bytes, features.moe_sparse, batch),
    }
    if features.temperature:
        per_token = b * d + b + 4 + 4 * temperature_hidden  # the division's query and temperature, softplus and GELU inputs
        if features.temperature_trainable:  # the MLP's fp32 input copy and its hidden activations
            per_token += 4 * temperature_hidden + (0 if b == ADAPTER_BYTES else 4 * d)
        terms["temperature"] = per_token * length
    if features.routing_capture and kind == "double":
        copies = 0 if b == ADAPTER_BYTES else 4 * d * (tokens.noisy + tokens.prompt)
        terms["routing maps"] = 4 * h * tokens.noisy * tokens.prompt + copies
    if features.static_routing:
        terms["static mask (per forward)"] = b * length * length
    return terms


def outside_saved_bytes(shape: FluxShape, tokens: Tokens, base_bytes: int) -> tuple[float, float]:
    """(per forward, per sample) bytes saved outside the blocks: RoPE tables; output norm and log-prob head."""
    rope = 8 * shape.attention_head_dim * tokens.total
    # the output LayerNorm's input is a slice of the last single block's output: its storage holds all L tokens
    stored = tokens.total if shape.num_single_layers else tokens.image
    per_sample = base_bytes * shape.width * stored + 8 * tokens.image + base_bytes * shape.width + 4 * shape.in_channels * tokens.noisy
    return rope, per_sample


@dataclass(frozen=True)
class ActivationEstimate:
    no_checkpointing: float
    checkpointing: float
    per_block: dict[str, float]  # the largest block's terms, per sample
    largest: float  # one block's full activations for the batch


def training_activations(shape: FluxShape, params: ParamCount, tokens: Tokens, base_bytes: int, batch: int, forwards: int,
                         features: Features = Features()) -> ActivationEstimate:
    """The autograd graph of ``forwards`` model calls of ``batch`` samples, back-propagated together, with and
    without block checkpointing, plus the backward working set (one block's activations)."""
    features = dataclasses.replace(features, temperature_trainable=params.temperature_trainable)
    by_block: dict[str, list[AdaptedLinear]] = {}
    for linear in params.linears:
        by_block.setdefault(linear.input_key.split("/")[0], []).append(linear)
    blocks = [(f"transformer_blocks.{i}", "double") for i in range(shape.num_layers)]
    blocks += [(f"single_transformer_blocks.{i}", "single") for i in range(shape.num_single_layers)]
    full, largest, largest_terms = 0.0, 0.0, {}
    for block_id, kind in blocks:
        terms = block_saved_bytes(kind, shape, tokens, base_bytes, by_block.get(block_id, ()), features, params.temperature_hidden,
                                  batch, first=block_id == "transformer_blocks.0")
        mask = terms.pop("static mask (per forward)", 0.0)
        per_sample = sum(terms.values())
        full += per_sample * batch + mask
        if per_sample * batch + mask > largest:
            largest, largest_terms = per_sample * batch + mask, terms
    rope, per_sample = outside_saved_bytes(shape, tokens, base_bytes)
    outside = rope + per_sample * batch
    inputs = base_bytes * shape.width * tokens.total * batch * len(blocks)
    no_ckpt = forwards * (full + outside) + BACKWARD_WORKING_SET * largest
    ckpt = forwards * (inputs + outside) + (1 + BACKWARD_WORKING_SET) * largest
    return ActivationEstimate(no_ckpt, ckpt, largest_terms, largest)


def inference_peak_bytes(shape: FluxShape, params: ParamCount, tokens: Tokens, base_bytes: int, batch: int) -> float:
    """Peak live bytes of one forward without grad (rollout): the widest single-block moment (module docstring)."""
    d, m = shape.width, shape.mlp
    k = max((linear.top_k for linear in params.linears if linear.kind == "moe"), default=0)
    per_token = 2 * base_bytes * d + base_bytes * (d + m) + 4 * (d + m) * (1 + k) + 12 * d
    return per_token * tokens.total * batch + 8 * shape.attention_head_dim * tokens.total


def vae_decode_bytes(height: int, width: int, batch: int, base_bytes: int) -> float:
    return VAE_DECODE_MAPS * VAE_DECODE_CHANNELS * height * width * batch * base_bytes


# ---- the plan ---------------------------------------------------------------------------------------------


@dataclass
class Line:
    role: str
    component: str
    no_ckpt: float  # bytes
    ckpt: float | None = None  # bytes; None: the same as no_ckpt
    kind: str = "static"  # "static" | "activations" | "transient" | "peak"

    @property
    def with_ckpt(self) -> float:
        return self.no_ckpt if self.ckpt is None else self.ckpt


@dataclass
class Options:
    base_dtype: str = "preset"
    shard_base: bool = False
    shard_adapters: bool = False
    gpu_gb: float = 80.0
    references: int = 2
    sft_processes: int = 8
    aspect: float = 1.0
    overrides: tuple[str, ...] = ()  # key=value overrides of every preset, as on the trainers' command lines


@dataclass
class Plan:
    name: str
    header: list[str]
    lines: list[Line]
    per_gpu: dict[str, tuple[float, float]]  # label -> (no ckpt, ckpt) bytes
    verdict: tuple[bool, bool]
    params: ParamCount
    policy_key: str
    notes: list[str] = field(default_factory=list)
    column: int = 0  # the column the preset runs with: 0 without, 1 with block checkpointing
    checkpointing_key: str = ""  # the preset's key that sets it

    @property
    def fits(self) -> bool:
        """Whether the preset fits as configured."""
        return self.verdict[self.column]


def _resolve(path: str) -> Path:
    """A preset path as given, or relative to the repository root."""
    given = Path(path)
    return given if given.exists() or given.is_absolute() else ROOT / given


def _display(path: str) -> str:
    resolved = _resolve(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def _load(path: str, overrides: Sequence[str] = ()):
    from rl_align.ippo.config import GSPOTrainConfig
    from rl_align.sft.config import SFTConfig

    path = str(_resolve(path))
    text = Path(path).read_text()
    is_sft = any(line.startswith("stage:") for line in text.splitlines())
    return (SFTConfig if is_sft else GSPOTrainConfig), load_config(SFTConfig if is_sft else GSPOTrainConfig, path, overrides)


def _policy_key(cfg: PolicyConfig) -> str:
    return json.dumps([dataclasses.asdict(cfg.lora), dataclasses.asdict(cfg.moe_lora), dataclasses.asdict(cfg.dual_branch), cfg.attention.temperature], default=list)


_COUNT_CACHE: dict[str, ParamCount] = {}


def preset_params(cfg: PolicyConfig) -> ParamCount:
    key = _policy_key(cfg)
    if key not in _COUNT_CACHE:
        _COUNT_CACHE[key] = count_parameters(build_policy(cfg))
    return _COUNT_CACHE[key]


def _text_encoder_params() -> int:
    return sum(FLUX_TEXT_ENCODERS.values())


def reward_models(reward_cfg) -> dict[str, int]:
    """The reward models a preset's reward config loads (by its preset name and id kinds)."""
    models: dict[str, int] = {}
    preset = getattr(reward_cfg, "preset", "")
    if preset in ("multi_human", "multi_object"):
        models.update(REWARD_MODELS["clip"])
        models.update(REWARD_MODELS["hps"])
        kinds = tuple(getattr(reward_cfg, "id_kinds", ()))
        if "face" in kinds:
            models.update(REWARD_MODELS["face"])
        if "object" in kinds:
            models.update(REWARD_MODELS["object"])
    return models


def learner_lines(role: str, params: ParamCount, b: int, name_b: str, shards: int, opts: Options, act: ActivationEstimate,
                  batch_bytes: float, encoders: float) -> list[Line]:
    base_div = shards if opts.shard_base else 1
    ad_div = shards if opts.shard_adapters else 1
    base_note = f"sharded / {shards}" if opts.shard_base else "replicated"
    ad_note = f"sharded / {shards}" if opts.shard_adapters else "replicated"
    gathered = []
    if shards > 1 and (opts.shard_base or opts.shard_adapters):
        block_base, block_adapters, block_trainable = params.largest_block
        # FSDP2 gathers a block whole for its forward and backward while prefetching the next one, and holds
        # that block's whole fp32 gradients until they are reduce-scattered
        unsharded = (b * block_base if opts.shard_base else 0) + (ADAPTER_BYTES * block_adapters if opts.shard_adapters else 0)
        gathered.append(Line(role, "FSDP: 2 blocks gathered + 1 block's whole gradients", 2 * unsharded + 4 * block_trainable * opts.shard_adapters,
                             kind="activations"))
    return [
        Line(role, f"base weights ({name_b}, {base_note})", b * params.base / base_div),
        Line(role, f"text encoders + VAE ({name_b}, frozen)", encoders),
        Line(role, f"adapters (fp32 master, {ad_note})", ADAPTER_BYTES * params.adapters / ad_div),
        Line(role, "gradients (fp32)", 4 * params.trainable / ad_div),
        Line(role, "AdamW states (fp32 m + v)", 8 * params.trainable / ad_div),
        Line(role, "batch (latents + conditioning)", batch_bytes),
        Line(role, "CUDA context", CUDA_CONTEXT_GIB * GIB),
        Line(role, "activations (fwd + bwd)", act.no_checkpointing, act.checkpointing, kind="activations"),
        *gathered,
        Line(role, "step transient (grad all-reduce / AdamW)", 4 * params.trainable / ad_div, kind="transient"),
    ]


def _peak(lines: Iterable[Line], role: str) -> tuple[float, float]:
    mine = [line for line in lines if line.role == role]
    static = [line for line in mine if line.kind == "static"]
    act = [line for line in mine if line.kind == "activations"]
    step = [line for line in mine if line.kind == "transient"]
    result = []
    for pick in (lambda line: line.no_ckpt, lambda line: line.with_ckpt):
        result.append(sum(map(pick, static)) + max([sum(map(pick, act)), sum(map(pick, step)), 0.0]))
    return result[0], result[1]


def plan_preset(path: str, opts: Options) -> Plan:
    kind, cfg = _load(path, opts.overrides)
    from rl_align.sft.config import SFTConfig

    is_sft = kind is SFTConfig
    if is_sft:
        from rl_align.sft.stages import stage_policy, stage_recipe

        policy_cfg = stage_policy(cfg.policy, cfg.stage)
        stage = stage_recipe(cfg.stage)
        switches = stage.switches
        features = Features(temperature=policy_cfg.attention.temperature, routing_capture=switches.capture_routing,
                            static_routing=policy_cfg.attention.static_routing, moe_sparse=moe_is_sparse())
        refs = cfg.curriculum.max_subjects if cfg.curriculum.enabled else opts.references
        height = cfg.data.target_size
        width = round(cfg.data.target_size * opts.aspect / 16) * 16
        if cfg.stage == "diptych":
            width, refs = 2 * width, 2  # two samples side by side, one reference each
        reference_size, batch, forwards, shards = cfg.data.reference_size, cfg.data.batch_size, 1, opts.sft_processes
        fsdp = cfg.sharding == "fsdp" and opts.sft_processes > 1
        opts = dataclasses.replace(opts, shard_base=opts.shard_base or fsdp, shard_adapters=opts.shard_adapters or fsdp)
        column = 1 if cfg.checkpoint_blocks else 0
        checkpointing_key = "checkpoint_blocks"
    else:
        policy_cfg = cfg.policy
        fsdp = cfg.learner.sharding == "fsdp" and cfg.workers.learners > 1  # FluxPolicy.shard_transformer: base and adapter state
        opts = dataclasses.replace(opts, shard_base=opts.shard_base or fsdp, shard_adapters=opts.shard_adapters or fsdp)
        column = 1 if cfg.learner.checkpoint_blocks else 0
        checkpointing_key = "learner.checkpoint_blocks"
        features = Features(temperature=policy_cfg.attention.temperature, static_routing=policy_cfg.attention.static_routing, moe_sparse=moe_is_sparse())
        refs = opts.references
        height = width = cfg.rollout.image_size
        reference_size, batch, forwards, shards = cfg.rollout.reference_size, cfg.rollout.chunk_size, cfg.sampler.window_size, cfg.workers.learners
    captions = policy_cfg.condition_prompts.tokens if policy_cfg.condition_prompts.enabled else 0
    tokens = Tokens.of(height, width, reference_size, refs, caption_tokens=captions)
    name_b = policy_cfg.dtype if opts.base_dtype == "preset" else opts.base_dtype
    b = BYTES[name_b]
    params = preset_params(policy_cfg)
    act = training_activations(FLUX_DEV_SHAPE, params, tokens, b, batch, forwards, features)
    encoders = b * _text_encoder_params()
    latents = LATENT_CHANNELS * (height // 8) * (width // 8) * 4
    conditioning = tokens.text * FLUX_DEV["joint_attention_dim"] * 4 + sum(tokens.references) * FLUX_DEV["in_channels"] * 4
    # IPPO: x_t and x_next of each window step; SFT: target latents, noise and x_t
    batch_bytes = batch * ((3 if is_sft else 2 * forwards) * latents + conditioning)
    header = [
        f"policy: FLUX.1-dev-shaped transformer ({Path(policy_cfg.path or '').name or policy_cfg.source}), base {name_b}{' (policy.dtype)' if opts.base_dtype == 'preset' else ' (--base-dtype)'}, adapters fp32"
        f"{'; stage ' + cfg.stage if is_sft else ''}",
        f"tokens per sample: text {tokens.text} + noisy {tokens.noisy} ({height}x{width} px) + {len(tokens.references)} refs x "
        f"{tokens.references[0] if tokens.references else 0} ({reference_size} px) = {tokens.total}; "
        + (f"graph: batch {batch} x 1 forward" if is_sft else f"learner graph: window {forwards} steps x chunk {batch} sample(s)"),
        f"parameters: base {params.base / 1e9:.3f}B, adapters {params.adapters / 1e9:.3f}B (trainable {params.trainable / 1e9:.3f}B, "
        f"{100 * params.adapters / params.base:.1f}% of base), text encoders + VAE {_text_encoder_params() / 1e9:.3f}B frozen",
    ]
    lines = []
    per_gpu: dict[str, tuple[float, float]] = {}
    notes = []
    if is_sft:
        role = "SFT process"
        lines += learner_lines(role, params, b, name_b, shards, opts, act, batch_bytes, encoders)
        vae = vae_decode_bytes(height, width, batch, b)
        lines.append(Line(role, "VAE encode of the batch (rough bound)", vae, kind="transient"))
        header.append(f"processes: {shards} (--sft-processes), one per GPU (sharding {cfg.sharding}, checkpoint_blocks {str(cfg.checkpoint_blocks).lower()}); "
                      f"sharding over them: base {'sharded' if opts.shard_base else 'replicated'}, "
                      f"adapter state {'sharded' if opts.shard_adapters else 'replicated'}")
        per_gpu["one SFT process"] = _peak(lines, role)
    else:
        w = cfg.workers
        lines += learner_lines("learner", params, b, name_b, shards, opts, act, batch_bytes, encoders)
        inference = inference_peak_bytes(FLUX_DEV_SHAPE, params, tokens, b, batch)
        decode = vae_decode_bytes(height, width, batch, b)
        lines += [
            Line("rollout", f"base weights ({name_b})", b * params.base),
            Line("rollout", "adapters (fp32, no gradients)", ADAPTER_BYTES * params.adapters),
            Line("rollout", f"text encoders + VAE ({name_b})", encoders),
            Line("rollout", "batch (latents, transitions, conditioning)", batch_bytes),
            Line("rollout", "CUDA context", CUDA_CONTEXT_GIB * GIB),
            Line("rollout", f"activations (one forward, no grad, chunk {batch})", inference, kind="activations"),
            Line("rollout", "VAE decode of the chunk", decode, kind="transient"),
        ]
        for model, count in reward_models(cfg.reward).items():
            lines.append(Line("reward", f"{model} (fp32)", 4 * count))
        lines.append(Line("reward", "CUDA context", CUDA_CONTEXT_GIB * GIB))
        shares = {"learner": w.gpus_per_learner, "rollout": w.gpus_per_rollout_worker, "reward": w.gpus_per_reward_worker}
        counts = {"learner": w.learners, "rollout": w.rollout_workers, "reward": w.reward_workers}
        on_gpu = [role for role, share in shares.items() if share > 0]
        total_share = sum(shares.values())
        header.append(
            f"learners: {w.learners} (learner.sharding {cfg.learner.sharding}, learner.checkpoint_blocks "
            f"{str(cfg.learner.checkpoint_blocks).lower()}); sharding: base {'sharded' if opts.shard_base else 'replicated'}, adapter state "
            f"{'sharded' if opts.shard_adapters else 'replicated'}; GPU shares: rollout {shares['rollout']:g} + learner "
            f"{shares['learner']:g} + reward {shares['reward']:g} = {total_share:g}"
            + (f" -> one of each per GPU ({max(counts[r] for r in on_gpu)} GPUs)" if on_gpu and total_share <= 1 + 1e-9 else "")
        )
        peaks = {role: _peak(lines, role) for role in shares}
        if on_gpu and total_share <= 1 + 1e-9:
            label = " + ".join(on_gpu)
            per_gpu[label] = tuple(sum(peaks[r][i] for r in on_gpu) for i in (0, 1))
        else:
            for role in on_gpu:
                per = max(1, math.floor(1 / shares[role] + 1e-9))
                per_gpu[f"{per} x {role}"] = (per * peaks[role][0], per * peaks[role][1])
        for role in shares:
            if shares[role] == 0:
                notes.append(f"{role}: GPU share 0, runs on the CPU (not counted)")
    for name, group in params.groups.items():
        if group.trainable < group.params:
            notes.append(f"{name}: {group.params - group.trainable:,d} of {group.params:,d} parameters are frozen as built "
                         "(no gradients or optimizer state counted for them)")
    limit = opts.gpu_gb * GIB
    worst = tuple(max(v[i] for v in per_gpu.values()) for i in (0, 1))
    verdict = (worst[0] <= limit, worst[1] <= limit)
    return Plan(_display(path), header, lines, per_gpu, verdict, params, _policy_key(policy_cfg), notes, column, checkpointing_key)


def _gib(value: float) -> str:
    return f"{value / GIB:12.2f}"


def format_plan(plan: Plan, opts: Options) -> str:
    out = [f"== {plan.name} ==", *plan.header]
    out.append(f"{'role':12s} {'component (GiB)':52s} {'no ckpt':>12s} {'block ckpt':>12s}")
    roles = list(dict.fromkeys(line.role for line in plan.lines))
    for role in roles:
        for line in (line for line in plan.lines if line.role == role):
            tag = {"activations": "", "transient": " *", "static": ""}[line.kind]
            out.append(f"{role:12s} {line.component + tag:52s} {_gib(line.no_ckpt)} {_gib(line.with_ckpt)}")
        peak = _peak(plan.lines, role)
        out.append(f"{role:12s} {'= peak (static + max(activations, *transients))':52s} {_gib(peak[0])} {_gib(peak[1])}")
    for label, (a, c) in plan.per_gpu.items():
        out.append(f"{'per GPU':12s} {label:52s} {_gib(a)} {_gib(c)}")
    words = ["FITS" if ok else "DOES NOT FIT" for ok in plan.verdict]
    out.append(f"{'verdict':12s} {f'on {opts.gpu_gb:g} GiB cards':52s} {words[0]:>12s} {words[1]:>12s}")
    out.append(f"{'as configured':12s} {['without', 'with'][plan.column] + f' block checkpointing ({plan.checkpointing_key})':52s} "
               f"{'FITS' if plan.fits else 'DOES NOT FIT':>12s}")
    out += [f"note: {note}" for note in plan.notes]
    return "\n".join(out)


GROUP_ORDER = (
    "LoRA attention projections (double blocks)", "LoRA attention projections (single blocks)",
    "LoRA FFN input ff.net.0.proj + ff_context.net.0.proj", "LoRA single blocks' proj_mlp",
    "MoE-LoRA experts on ff.net.2", "MoE-LoRA experts on ff_context.net.2", "MoE-LoRA experts on single blocks' proj_out",
    "MoE-LoRA gates (all MoE layers)", "dual-branch LoRA (double blocks)", "dual-branch LoRA (single blocks)", "attention temperature MLPs",
)


def format_counts(params: ParamCount, title: str) -> str:
    out = [f"-- exact adapter parameters per layer type ({title}) --",
           f"{'layer type':56s} {'layers':>6s} {'per layer':>12s} {'counted':>14s} {'formula':>14s}"]
    ordered = sorted(params.groups.items(), key=lambda item: (GROUP_ORDER.index(item[0]) if item[0] in GROUP_ORDER else len(GROUP_ORDER), item[0]))
    for name, group in ordered:
        per = group.params // group.layers if group.layers else 0
        check = "" if group.params == group.formula else "  MISMATCH"
        if group.trainable < group.params:
            check += f"  (trainable {group.trainable:,d})"
        out.append(f"{name:56s} {group.layers:6d} {per:12,d} {group.params:14,d} {group.formula:14,d}{check}")
    out.append(f"{'all adapters':56s} {len(params.linears):6d} {'':12s} {params.adapters:14,d} "
               f"{sum(g.formula for g in params.groups.values()):14,d}")
    out.append(f"base transformer {params.base:,d}; adapters / base = {100 * params.adapters / params.base:.1f}%, "
               f"adapters / (base + adapters) = {100 * params.adapters / (params.base + params.adapters):.1f}%; "
               f"plain LoRA layers {params.layers_of('lora')}, MoE-LoRA layers {params.layers_of('moe')}, dual-branch layers {params.layers_of('dual')}")
    return "\n".join(out)


# ---- validation on reduced-width models (CPU) -----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    config: str  # a preset whose policy (and stage) it uses
    mode: str  # "train" | "ckpt" | "infer"
    dtype: str = "bfloat16"
    batch: int = 1
    forwards: int = 2
    references: int = 2
    image_size: int = 512
    reference_size: int = 320
    routing_capture: bool = False


VALIDATION_CASES = (
    Case("MultiCrafter LoRA + MoE, bf16 base, window 2", "configs/ippo_multi_human.yaml", "train"),
    Case("MultiCrafter, bf16, block checkpointing", "configs/ippo_multi_human.yaml", "ckpt"),
    Case("MultiCrafter, fp32 base (as the preset)", "configs/ippo_multi_human.yaml", "train", dtype="float32"),
    Case("MultiCrafter, rollout forward (no grad)", "configs/ippo_multi_human.yaml", "infer", forwards=1),
    Case("MUSAR dual-branch, batch 2, 1 forward", "configs/sft/musar_diptych.yaml", "train", batch=2, forwards=1, reference_size=512),
    Case("One-for-All temperature, 1 forward", "configs/sft/one_for_all_position_id.yaml", "train", forwards=1, image_size=768, reference_size=576),
    Case("AnyStory routing capture, 1 forward", "configs/sft/anystory_routing.yaml", "train", forwards=1, routing_capture=True),
)


def _case_policy(case: Case, shape: FluxShape) -> tuple[PolicyConfig, Features]:
    kind, cfg = _load(case.config)
    policy_cfg = cfg.policy
    if hasattr(cfg, "stage"):
        from rl_align.sft.stages import stage_policy

        policy_cfg = stage_policy(cfg.policy, cfg.stage)
    # static routing's mask path differs between the CPU and CUDA kernels: the validation runs without it
    policy_cfg = dataclasses.replace(scaled_policy(policy_cfg, shape), dtype=case.dtype,
                                     attention=dataclasses.replace(policy_cfg.attention, static_routing=False, dynamic_routing=False))
    return policy_cfg, Features(temperature=policy_cfg.attention.temperature, routing_capture=case.routing_capture, moe_sparse=moe_is_sparse())


def _case_tokens(case: Case, policy_cfg: PolicyConfig) -> Tokens:
    captions = policy_cfg.condition_prompts.tokens if policy_cfg.condition_prompts.enabled else 0
    return Tokens.of(case.image_size, case.image_size, case.reference_size, case.references, caption_tokens=captions)


def predict_case(case: Case, shape: FluxShape = REDUCED_SHAPE) -> dict[str, float]:
    policy_cfg, features = _case_policy(case, shape)
    params = count_parameters(build_policy(policy_cfg, shape))
    tokens = _case_tokens(case, policy_cfg)
    b = BYTES[case.dtype]
    if case.mode == "infer":
        return {"predicted": inference_peak_bytes(shape, params, tokens, b, case.batch), "saved": 0.0}
    act = training_activations(shape, params, tokens, b, case.batch, case.forwards, features)
    saved = act.no_checkpointing - BACKWARD_WORKING_SET * act.largest
    predicted = act.checkpointing if case.mode == "ckpt" else act.no_checkpointing
    # the graph's gradients of the adapters exist already (warm-up); the prediction is activations only
    return {"predicted": predicted, "saved": saved}


def _case_inputs(policy: FluxPolicy, case: Case, tokens: Tokens, shape: FluxShape):
    from policies.attention import TokenLayout
    from policies.ids import grid_ids, reference_ids, text_ids
    from policies.policy import Conditioning
    from samplers.rollout import WindowTransition

    generator = torch.Generator().manual_seed(0)
    side = case.image_size // PIXELS_PER_TOKEN
    grids = [(case.reference_size // PIXELS_PER_TOKEN,) * 2] * case.references
    scheme = policy.cfg.position_scheme
    condition_ids = list(range(1, case.references + 1)) if scheme == "condition_id" else None
    refs = reference_ids(scheme, (side, side), grids, condition_ids)
    spans = tuple((4 * i, 4 * i + 3) for i in range(case.references))
    captions = tuple((tokens.text - tokens.prompt) // case.references for _ in range(case.references)) if tokens.text > tokens.prompt else ()
    layout = TokenLayout(tokens.text, tokens.noisy, tokens.references, captions)
    conditioning = Conditioning(
        torch.randn(1, tokens.text, shape.joint_attention_dim, generator=generator), torch.randn(1, shape.pooled_projection_dim, generator=generator),
        torch.randn(1, sum(tokens.references), shape.in_channels, generator=generator),
        text_ids(scheme, tokens.text, spans if scheme == "condition_id" else None, refs), torch.cat([grid_ids((side, side)), *refs]),
        (side, side), layout, spans,
    )
    latent = (LATENT_CHANNELS, 2 * side, 2 * side)
    transitions = [
        WindowTransition(i, 0.9 - 0.1 * i, 0.8 - 0.1 * i, torch.randn(case.batch, *latent, generator=generator),
                         torch.randn(case.batch, *latent, generator=generator), torch.zeros(case.batch), 0.7, "mean")
        for i in range(case.forwards)
    ]
    return conditioning, transitions


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure_case(case: Case, shape: FluxShape = REDUCED_SHAPE, peak: bool = True) -> dict[str, float]:
    """Run the case's step on the CPU twice; the second run's saved-tensor tally and (with ``peak``) its peak RSS
    increase. Meant for a fresh process (``--measure``): the peak needs a clean resident set."""
    from rl_align.ippo.learner import window_log_probs

    torch.manual_seed(0)
    policy_cfg, features = _case_policy(case, shape)
    policy = build_policy(policy_cfg, shape, device="cpu", dtype=getattr(torch, case.dtype))
    if case.mode == "ckpt":
        policy.enable_block_checkpointing()
    tokens = _case_tokens(case, policy_cfg)
    conditioning, transitions = _case_inputs(policy, case, tokens, shape)
    switches = dataclasses.replace(policy.attention_mode, capture_routing=case.routing_capture)
    params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    def step() -> None:
        if case.mode == "infer":
            with torch.no_grad():
                policy(transitions[0].x_t, torch.full((case.batch,), transitions[0].sigma), conditioning, switches)
            return
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            velocity = policy.velocity_fn(conditioning, switches)
            if case.routing_capture:
                out = policy(transitions[0].x_t, torch.full((case.batch,), transitions[0].sigma), conditioning, switches)
                loss = out.velocity.square().mean() + out.routing_maps.mean()
            else:
                loss = -window_log_probs(velocity, transitions).log_probs.mean()
        loss.backward()

    step()
    seen.clear()
    result = {}
    try:
        before = _status("VmRSS") if peak else None
        if peak:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:  # no /proc: no peak
        before = None
    step()
    result["peak"] = float(_status("VmHWM") - before) if before is not None else math.nan
    result["tally"] = float(sum(seen.values()))
    return result


def run_validation(cases: Sequence[Case] = VALIDATION_CASES, shape: FluxShape = REDUCED_SHAPE) -> list[dict]:
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for index, case in enumerate(cases):
        completed = subprocess.run([sys.executable, __file__, "--measure", str(index)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        if completed.returncode:
            raise RuntimeError(f"validation case {case.name!r} failed:\n{completed.stderr[-3000:]}")
        measured = json.loads(completed.stdout.strip().splitlines()[-1])
        rows.append({"case": case, **predict_case(case, shape), **measured})
    return rows


def parameter_check(shape: FluxShape = REDUCED_SHAPE) -> list[str]:
    """Meta-device counts against a real instantiated reduced model, for each paper policy."""
    out = [f"-- parameters: meta-device count vs a real CPU model ({shape.num_layers} double + {shape.num_single_layers} single blocks, "
           f"{shape.num_attention_heads} heads x {shape.attention_head_dim}) --"]
    done = set()
    for config in (*IPPO_PRESETS, *SFT_PRESETS):
        policy_cfg, _ = _case_policy(Case("", config, "train"), shape)
        key = _policy_key(policy_cfg)
        if key in done:
            continue
        done.add(key)
        meta = count_parameters(build_policy(policy_cfg, shape))
        real = count_parameters(build_policy(policy_cfg, shape, device="cpu"))
        same = (meta.base, meta.adapters, meta.trainable) == (real.base, real.adapters, real.trainable)
        formula = sum(g.formula for g in meta.groups.values())
        out.append(f"{Path(config).stem:28s} base {meta.base:,d} / {real.base:,d}, adapters {meta.adapters:,d} / {real.adapters:,d} "
                   f"(formula {formula:,d}): {'equal' if same and formula == meta.adapters else 'DIFFERENT'}")
    return out


def format_validation(rows: Sequence[dict], shape: FluxShape = REDUCED_SHAPE) -> str:
    out = [f"-- activation model vs measured, reduced width (d {shape.width}, {shape.num_layers} double + {shape.num_single_layers} single, "
           f"preset token counts, CPU; MiB) --",
           f"{'case':44s} {'model':>8s} {'tally':>8s} {'peak':>8s} {'tally/model':>11s} {'peak/model':>10s}"]
    for row in rows:
        case = row["case"]
        saved = f"{row['tally'] / 2**20:8.1f}" if case.mode == "train" else f"{'-':>8s}"
        ratio = f"{row['tally'] / row['saved']:11.3f}" if case.mode == "train" else f"{'-':>11s}"
        out.append(f"{case.name:44s} {row['predicted'] / 2**20:8.1f} {saved} {row['peak'] / 2**20:8.1f} {ratio} {row['peak'] / row['predicted']:10.3f}")
    out.append("model: the predicted activations (training: saved tensors + the backward working set; checkpointing: block inputs + "
               "1.5 blocks; rollout: inference_peak_bytes)")
    out.append("tally: bytes autograd saved in the step (distinct storages, no parameters), against the model's saved-tensor part "
               "(tally/model); checkpointed inputs are kept outside the saved-tensor hooks, so no tally there")
    out.append("peak: measured increase of the peak resident set during the step (after a warm-up step; adapter gradients already allocated)")
    return "\n".join(out)


# ---- command line ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="a preset (IPPO or SFT); may be repeated")
    parser.add_argument("--all", action="store_true", help="every paper preset (the IPPO and the SFT presets)")
    parser.add_argument("--base-dtype", choices=("preset", *BYTES), default="preset", help="base weight dtype (default: policy.dtype of the preset)")
    parser.add_argument("--shard-base", action="store_true", help="what-if: shard the base weights over the learners / SFT processes (the IPPO presets set it with learner.sharding: fsdp)")
    parser.add_argument("--shard-adapters", action="store_true", help="what-if: shard adapters, gradients and AdamW states too (FSDP2; IPPO: learner.sharding)")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory in GiB for the verdict")
    parser.add_argument("--references", type=int, default=2, help="references per task (IPPO, and SFT without a subject curriculum)")
    parser.add_argument("--sft-processes", type=int, default=8, help="data-parallel processes of the SFT presets (the sharding divisor)")
    parser.add_argument("--aspect", type=float, default=1.0, help="SFT targets' long/short side ratio (One-for-All's paper: 1024x768 = 1.333)")
    parser.add_argument("--no-validate", action="store_true", help="skip the reduced-width CPU validation")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of every preset (e.g. learner.sharding=replicate)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure is not None:  # a validation case in its own process
        torch.set_num_threads(1)
        print(json.dumps(measure_case(VALIDATION_CASES[args.measure])))
        return 0
    configs = list(args.config) + (list(IPPO_PRESETS) + list(SFT_PRESETS) if args.all else [])
    if not configs:
        print("give --config <preset> (repeatable) or --all", file=sys.stderr)
        return 2
    opts = Options(args.base_dtype, args.shard_base, args.shard_adapters, args.gpu_gb, args.references, args.sft_processes, args.aspect,
                   tuple(args.overrides))
    sparse = "sparse top-k dispatch" if moe_is_sparse() else "dense (every expert computed)"
    print(f"memory plan: GiB = 2^30 bytes; MoE-LoRA forward: {sparse}; CUDA context {CUDA_CONTEXT_GIB} GiB per process (assumed); "
          f"'*' rows are transients that do not coexist with the activations")
    counted = set()
    for config in dict.fromkeys(configs):
        plan = plan_preset(config, opts)
        print()
        print(format_plan(plan, opts))
        if plan.policy_key not in counted:
            counted.add(plan.policy_key)
            print(format_counts(plan.params, f"policy of {Path(config).name}"))
    if not args.no_validate:
        print()
        print("\n".join(parameter_check()))
        print(format_validation(run_validation()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
