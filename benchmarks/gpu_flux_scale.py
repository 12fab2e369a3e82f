"""FLUX.1-dev at paper scale on one GPU: a random-init, FLUX.1-dev-shaped transformer in bf16 with the
MultiCrafter adapters (configs/policy/multicrafter_flux_dev.yaml: LoRA r512 + MoE-LoRA 4 experts top-1 r512),
built through ``policies.FluxPolicy`` so the library's processor, adapters, sampler and learner code runs.

Measured, each as warm-up 1 + --steps timed repeats (median):
- rollout step: one model call without grad for batch 1 at 512 px with two 320 px references (the policy's
  conditioning), plus the SDE step with its log-prob (samplers.sde_step_with_logprob), as a rollout worker takes it
- learner step: the real IPPO path over a window of 2 stored transitions (rl_align.ippo.learner.window_log_probs
  + rl_align.ippo.losses.gspo_objective, backward), with activation checkpointing
  (``FluxPolicy.enable_block_checkpointing()``, what learner.checkpoint_blocks turns on), then the optimizer step (rl_align.core.optim.apply_step:
  grad-norm clip + AdamW) timed apart. AdamW's states are resident before the timed repeats (the warm-up step
  creates them), as in a learner after its first update
- peak memory: torch.cuda.max_memory_allocated on CUDA (allocator peak, not counting the CUDA context); on the
  CPU the process's peak RSS (VmHWM after a /proc/self/clear_refs reset) above its RSS before the model was built
  (weights included; it also holds the tokenizers and what the allocator caches, so at the reduced width it sits
  far above the plan: the CPU run shows that the script works, not the memory model)
- the plan: benchmarks/memory_plan.py's parameter count and activation model (count_parameters,
  training_activations, inference_peak_bytes)
- FLOPs from the shapes of the built model, per call: 2 d_in d_out S for every linear on its S tokens (base, LoRA
  A and B, MoE gate and the top-k active experts), attention 4 L^2 d per block (QK^T and AV) for the
  L = text + noisy + reference tokens; training counts backward = 2 x forward and checkpointing one more
  forward (the model-FLOPs convention; "executed" counts the frozen base's backward as 1 x, input gradients
  only). Achieved TFLOP/s against --peak-tflops (the dense bf16 roofline: detected for A100/H100/H200).

Memory at paper scale (``--count-only --preset flux-dev``): base 11.90B parameters in bf16 (22.2 GiB) + 4.07B
adapter parameters (LoRA 1.43B + MoE-LoRA 2.63B) in fp32 with gradients and AdamW states (16 B each, 60.6 GiB) + the
checkpointed activations of a window of 2: memory_plan predicts 85.7 GiB for the learner's forward + backward and
98.4 GiB during the AdamW step, so one H200 (141 GB) holds one unsharded learner step and an 80 GB card does not
(shard the trainable state, DESIGN.md; ``--optimizer none`` measures forward + backward alone). Differences from FLUX.1-dev: the text encoders are the tiny preset's
(1 layer at FLUX's widths 4096 / 768; T5-XXL and CLIP-L are not built) and the VAE is a random-init
AutoencoderKL with FLUX's config (16 latent channels, factor 8), so the transformer's shapes are exactly FLUX.1-dev's.

    python benchmarks/gpu_flux_scale.py                       # CUDA: FLUX.1-dev shapes, bf16
    python benchmarks/gpu_flux_scale.py --cpu-small           # CPU: 2 + 2 blocks, 4 heads of 32, rank 16, 128 px
    python benchmarks/gpu_flux_scale.py --count-only --preset flux-dev   # shapes, FLOPs and plan on the meta device
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: the packages live in the repository root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: E402

from policies import FluxPolicy, PolicyConfig, TinyFluxConfig, TokenLayout, build_tiny_components  # noqa: E402
from policies.adapters import MoELoRALinear  # noqa: E402
from policies.components import AutoencoderKLCodec, FluxComponents  # noqa: E402
from rl_align.core.config import load_config  # noqa: E402
from rl_align.core.optim import apply_step, make_optimizer  # noqa: E402
from rl_align.ippo.learner import LearnerConfig, window_log_probs  # noqa: E402
from rl_align.ippo.losses import gspo_objective  # noqa: E402
from samplers import WindowTransition  # noqa: E402
from samplers.schedule import flux_sigmas  # noqa: E402
from samplers.steps import sde_step_with_logprob  # noqa: E402

GIB = 2**30
PRESET_CONFIG = ROOT / "configs" / "policy" / "multicrafter_flux_dev.yaml"
LATENT_CHANNELS = 16  # FLUX.1's VAE; 2x2 packing gives the transformer's 64 input channels
PROMPT = "a photo of a woman and a man standing side by side in a park"

# Datasheet peaks by device name (the first key found in the name wins), TFLOP/s: dense bf16 tensor cores (no
# sparsity), and plain fp32 (no TF32), the rate of the fp32 adapter matmuls unless --tf32.
ROOFLINES = (("H100 PCIe", 756.0, 51.0), ("H100 NVL", 835.0, 60.0), ("H200 NVL", 835.0, 60.0), ("H200", 989.0, 67.0),
             ("H100", 989.0, 67.0), ("A100", 312.0, 19.5))


@dataclass(frozen=True)
class Preset:
    num_layers: int
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int
    pooled_projection_dim: int
    rank: int
    image_size: int
    reference_size: int
    text_tokens: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    steps: int


PRESETS = {
    # FLUX.1-dev's transformer/config.json; its VAE config; 512 T5 tokens (FluxPipeline's max_sequence_length)
    "flux-dev": Preset(19, 38, 24, 128, 4096, 768, 512, 512, 320, 512, (128, 256, 512, 512), 2, 3),
    # reduced width for the CPU: FLUX-shaped, 2 + 2 blocks, 4 heads of 32 (memory_plan's validation width)
    "cpu-small": Preset(2, 2, 4, 32, 64, 64, 16, 128, 80, 64, (32, 32, 32, 32), 1, 2),
}


def flux_shape(double: int, single: int, heads: int, head_dim: int, text_dim: int, pooled_dim: int) -> "FluxShape":
    """memory_plan's FluxShape (the FluxTransformer2DModel arguments) with FLUX.1's rope split scaled to head_dim."""
    return MEMORY_PLAN.FluxShape(double, single, heads, head_dim, text_dim, pooled_dim, axes_dims_rope=rope_axes(head_dim))


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX.1's (16, 56, 56) split of a 128-wide head, scaled: even entries summing to head_dim."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"attention head dim must be even and >= 6, got {head_dim}")
    first = max(2, 2 * round(head_dim / 16))
    second = (head_dim - first) // 4 * 2
    return first, second, head_dim - first - second


# ---- FLOPs from the shapes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flops:
    base: float = 0.0  # the frozen base's linears (bf16)
    lora: float = 0.0  # plain LoRA A and B (fp32)
    moe: float = 0.0  # MoE-LoRA gate + the top-k active experts (fp32)
    attention: float = 0.0  # QK^T and AV

    @property
    def total(self) -> float:
        return self.base + self.lora + self.moe + self.attention

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __mul__(self, factor: float) -> "Flops":
        return Flops(*(a * factor for a in dataclasses.astuple(self)))

    __rmul__ = __mul__


def linear_flops(d_in: int, d_out: int, tokens: int) -> float:
    """A d_in -> d_out matmul on ``tokens`` rows: one multiply-add (2 FLOPs) per weight and row."""
    return 2.0 * d_in * d_out * tokens


def lora_flops(d_in: int, d_out: int, rank: int, tokens: int) -> float:
    """B A x: the down (d_in -> r) and the up (r -> d_out) projection."""
    return linear_flops(d_in, rank, tokens) + linear_flops(rank, d_out, tokens)


def moe_lora_flops(d_in: int, d_out: int, rank: int, experts: int, top_k: int, tokens: int) -> float:
    """The gate (d_in -> N_e) on every token plus top_k rank-r experts per token (sparse dispatch)."""
    return linear_flops(d_in, experts, tokens) + top_k * lora_flops(d_in, d_out, rank, tokens)


def attention_flops(length: int, width: int) -> float:
    """QK^T (2 L^2 d) and AV (2 L^2 d) over all heads, d = heads x head_dim; softmax not counted."""
    return 4.0 * length * length * width


def linear_tokens(path: str, layout: TokenLayout) -> int:
    """Rows (per sample) that the linear at ``path`` in a FluxTransformer2DModel multiplies: the image stream
    (noisy + references), the text stream, the joint sequence (single blocks) or the one conditioning vector
    (AdaLN modulation, time / guidance / pooled-text embedders)."""
    image, text = layout.noisy + sum(layout.references), layout.text
    parts = path.split(".")
    local = ".".join(parts[2:])
    if parts[0] == "transformer_blocks":
        if local.startswith(("norm1.", "norm1_context.")):
            return 1
        if local.startswith(("attn.add_", "attn.to_add_out", "ff_context.")):
            return text
        if local.startswith(("attn.to_", "ff.")):
            return image
    elif parts[0] == "single_transformer_blocks":
        if local.startswith("norm."):
            return 1
        if local.startswith(("attn.to_", "proj_mlp", "proj_out")):
            return layout.total
    elif parts[0] in ("x_embedder", "proj_out"):
        return image  # the final projection runs on the references too; the policy slices the noisy part after
    elif parts[0] == "context_embedder":
        return text
    elif parts[0] in ("time_text_embed", "norm_out"):
        return 1
    raise ValueError(f"no FLOP rule for the linear {path!r} (a module this counter does not know)")


def _strip_adapter(path: str) -> tuple[str, str]:
    """(the adapted layer's path, "base" | "lora" | "moe") for a linear inside peft's LoRA or MoELoRALinear."""
    for marker, kind in ((".lora_A.", "lora"), (".lora_B.", "lora")):
        if marker in path:
            return path.split(marker)[0], kind
    for suffix, kind in ((".base_layer", "base"), (".base", "base"), (".gate", "moe")):
        if path.endswith(suffix):
            return path[: -len(suffix)], kind
    return path, "base"


def forward_flops(transformer: torch.nn.Module, layout: TokenLayout, batch: int = 1) -> Flops:
    """FLOPs of one transformer call on ``batch`` samples with ``layout``, from the shapes of the modules."""
    counts = {"base": 0.0, "lora": 0.0, "moe": 0.0}
    for path, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):  # base layers, peft's lora_A / lora_B, MoE-LoRA gates
            layer, kind = _strip_adapter(path)
            counts[kind] += linear_flops(module.in_features, module.out_features, linear_tokens(layer, layout))
        elif isinstance(module, MoELoRALinear):  # its experts are parameters, not modules (the gate is counted above)
            _, rank, d_in = module.lora_A.shape
            counts["moe"] += module.top_k * lora_flops(d_in, module.lora_B.shape[1], rank, linear_tokens(path, layout))
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    attention = blocks * attention_flops(layout.total, transformer.inner_dim)
    return Flops(counts["base"], counts["lora"], counts["moe"], attention) * batch


def training_flops(forward: Flops, checkpointing: bool) -> Flops:
    """Model FLOPs of forward + backward: backward = 2 x forward, checkpointing recomputes one forward."""
    return forward * (3 + int(checkpointing))


def executed_training_flops(forward: Flops, checkpointing: bool) -> Flops:
    """As training_flops, but the frozen base's backward computes input gradients only (1 x its forward)."""
    base = forward.base * (2 + int(checkpointing))
    return dataclasses.replace(training_flops(forward, checkpointing), base=base)


# ---- memory -----------------------------------------------------------------------------------------------


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class MemoryMeter:
    """Peak memory over a region: the CUDA allocator's peak (tensors only; no CUDA context), or on the CPU the
    process's peak RSS above its RSS when the meter was made (before the model is built; freed memory that the
    allocator keeps counts, so it is an upper bound of the live bytes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.source = ("torch.cuda.max_memory_allocated" if self.cuda
                       else "CPU peak RSS (VmHWM after a clear_refs reset) above the RSS before the build")
        self._can_reset = self.cuda or self._reset_rss()
        self.offset = 0 if self.cuda else self._status("VmRSS")

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:  # "5": reset the peak RSS to the current RSS
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> int:
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @contextlib.contextmanager
    def peak(self) -> Iterator[dict]:
        """Yields a dict that holds, after the block, the peak bytes (nan where it cannot be measured)."""
        result = {"peak": math.nan}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._can_reset:
            self._reset_rss()
        yield result
        if self.cuda:
            torch.cuda.synchronize(self.device)
            result["peak"] = torch.cuda.max_memory_allocated(self.device)
        elif self._can_reset:
            result["peak"] = self._status("VmHWM") - self.offset


def load_memory_plan():
    """benchmarks/memory_plan.py as a module (the benchmarks are files, not a package)."""
    name = "_gpu_flux_scale_memory_plan"  # registered (its dataclasses need it) under a name nobody else imports
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


MEMORY_PLAN = load_memory_plan()
FluxShape = MEMORY_PLAN.FluxShape


@dataclass
class Plan:
    """Predicted peak bytes per measurement and where the prediction comes from."""

    source: str
    rollout: float
    learner: float
    optimizer_step: float
    static_learner: float  # resident during a learner step: weights, adapters, text encoders + VAE, grads, AdamW


def make_plan(policy: FluxPolicy, shape: FluxShape, layout: TokenLayout, batch: int, window: int, checkpointing: bool,
              base_bytes: int, encoders: int, batch_bytes: int) -> Plan:
    """Predicted peaks (memory_plan's parameter count and activation model): rollout = weights + adapters +
    text encoders/VAE + one no-grad forward; learner = that + gradients + AdamW states + the batch + the
    activations of ``window`` forwards; optimizer step = the static part + the fp32 gradient-sized transient."""
    module = MEMORY_PLAN
    params = module.count_parameters(policy)
    tokens = module.Tokens(layout.text, layout.noisy, tuple(layout.references), layout.prompt)
    act = module.training_activations(shape, params, tokens, base_bytes, batch, window)
    activations = act.checkpointing if checkpointing else act.no_checkpointing
    inference = module.inference_peak_bytes(shape, params, tokens, base_bytes, batch)
    weights = base_bytes * params.base + 4 * params.adapters + encoders
    static = weights + 12 * params.trainable + batch_bytes
    return Plan("benchmarks/memory_plan.py (count_parameters, training_activations, inference_peak_bytes)",
                weights + inference, static + activations, static + 4 * params.trainable, static)


def _frozen_adapter_parameters(policy: FluxPolicy) -> list[torch.nn.Parameter]:
    """Adapter parameters that do not train (a frozen MoE gate), so they are not counted as base."""
    frozen = []
    for module in policy.transformer.modules():
        if isinstance(module, MoELoRALinear):
            frozen += [p for p in module.adapter_parameters().values() if not p.requires_grad]
    return frozen


# ---- building -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def vae_config(channels: Sequence[int], layers: int) -> dict:
    """FLUX.1's AutoencoderKL config at the given widths (16 latent channels, factor 2^(len - 1) = 8)."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=tuple(channels), layers_per_block=layers,
        latent_channels=LATENT_CHANNELS, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def policy_config(rank: int, dtype: str, shape: FluxShape, text_tokens: int) -> PolicyConfig:
    """The MultiCrafter preset with source tiny (no weights loaded), the given dtype and adapter rank."""
    cfg = load_config(PolicyConfig, PRESET_CONFIG)
    tiny = TinyFluxConfig(
        num_layers=shape.num_layers, num_single_layers=shape.num_single_layers, num_attention_heads=shape.num_attention_heads,
        attention_head_dim=shape.attention_head_dim, axes_dims_rope=shape.axes_dims_rope, joint_attention_dim=shape.joint_attention_dim,
        pooled_projection_dim=shape.pooled_projection_dim, guidance_embeds=shape.guidance_embeds, vae_scale_factor=8, t5_max_length=text_tokens,
    )
    return dataclasses.replace(
        cfg, source="tiny", path=None, dtype=dtype, tiny=tiny,
        lora=dataclasses.replace(cfg.lora, rank=rank, alpha=float(rank)),
        moe_lora=dataclasses.replace(cfg.moe_lora, rank=rank, alpha=float(rank)),
    )


def build_policy(cfg: PolicyConfig, shape: FluxShape, preset: Preset, device: torch.device, text_tokens: int) -> FluxPolicy:
    """FluxPolicy(components, cfg) around a FLUX-shaped transformer and VAE constructed directly on ``device`` in
    ``cfg.dtype`` (no CPU init of 12B parameters), and the tiny preset's text encoders at FLUX's widths."""
    dtype = getattr(torch, cfg.dtype)
    # the tiny preset's tokenizers and 1-layer encoders; its own (minimal) transformer and codec are dropped
    text = build_tiny_components(TinyFluxConfig(
        num_layers=1, num_single_layers=1, num_attention_heads=1, attention_head_dim=8, axes_dims_rope=(2, 2, 4),
        joint_attention_dim=shape.joint_attention_dim, pooled_projection_dim=shape.pooled_projection_dim, t5_max_length=text_tokens,
    ))
    for model in (text.text_encoder, text.text_encoder_2):
        torch.nn.Module.to(model, device=device, dtype=dtype)
    with torch.device(device):
        with default_dtype(dtype):
            transformer = FluxTransformer2DModel(**shape.kwargs()).eval()
            vae = AutoencoderKL(**vae_config(preset.vae_channels, preset.vae_layers)).eval()
        components = FluxComponents(transformer, AutoencoderKLCodec(vae).eval(), text.text_encoder, text.tokenizer,
                                    text.text_encoder_2, text.tokenizer_2, text.t5_max_length)
        return FluxPolicy(components, cfg)  # adapters are created in fp32 on the device


# ---- the measurements ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


@dataclass
class Row:
    name: str
    seconds: float = math.nan
    flops: float = math.nan  # model FLOPs
    executed: float = math.nan  # executed FLOPs (frozen base backward: input gradients only)
    peak: float = math.nan
    plan: float | None = None
    note: str = ""


def oom_types() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,)


def detect_roofline(device: torch.device, given: float | None) -> tuple[float | None, float | None, str]:
    """(dense bf16 peak, fp32 peak or None, description) in TFLOP/s; (None, None, 'n/a') on the CPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    fp32 = next((f for key, _, f in ROOFLINES if key in name), None) if name else None
    if given is not None:
        return given, fp32, f"{given:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, None, "n/a on the CPU"
    for key, value, fp32 in ROOFLINES:
        if key in name:
            return value, fp32, f"{value:g} TFLOP/s dense bf16 ({name} datasheet)"
    raise SystemExit(f"unknown GPU {name!r}: give its dense bf16 peak with --peak-tflops")


def format_table(rows: Sequence[Row], roofline: float | None) -> list[str]:
    header = f"{'measurement':<34} {'time ms':>9} {'FLOP':>10} {'FLOP/s':>10} {'% roof':>7} {'peak GiB':>9} {'plan GiB':>9}  note"
    lines = [header, "-" * len(header)]
    for row in rows:
        rate = row.flops / row.seconds if row.seconds > 0 and math.isfinite(row.flops) else math.nan
        roof = f"{100 * rate / (roofline * 1e12):.1f}%" if roofline and math.isfinite(rate) else "n/a"
        plan = f"{row.plan / GIB:9.3f}" if row.plan is not None else f"{'n/a':>9}"
        lines.append(f"{row.name:<34} {1e3 * row.seconds:9.1f} {si(row.flops):>10} {si(rate):>10} {roof:>7} {row.peak / GIB:9.3f} {plan}  {row.note}")
    return lines


def run(args: argparse.Namespace, out: Callable[[str], None]) -> dict:
    """Build, count, measure and print; returns the numbers (rows, FLOPs, parameter counts, plan)."""
    device = torch.device(args.device)
    shape = flux_shape(args.layers, args.single_layers, args.heads, args.head_dim, args.text_dim, args.pooled_dim)
    base_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    roofline, fp32_peak, roofline_text = detect_roofline(device, args.peak_tflops)
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = policy_config(args.rank, args.dtype, shape, args.text_tokens)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    out(f"device {device}{name}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}, roofline {roofline_text}")
    out(f"shape: {shape.num_layers} double + {shape.num_single_layers} single blocks, {shape.num_attention_heads} heads x "
        f"{shape.attention_head_dim} (width {shape.width}), rope {shape.axes_dims_rope}, text dim {shape.joint_attention_dim}, "
        f"in_channels {shape.in_channels}, {args.dtype}; MultiCrafter adapters (fp32): LoRA r{cfg.lora.rank} on "
        f"{len(cfg.lora.target_modules)} layer types, MoE-LoRA {cfg.moe_lora.num_experts} experts top-{cfg.moe_lora.top_k} r{cfg.moe_lora.rank}")

    meter = MemoryMeter(device)  # on the CPU, peaks are counted above the RSS before the build
    start = time.perf_counter()
    policy = build_policy(cfg, shape, PRESETS[args.preset], torch.device("meta") if args.count_only else device, args.text_tokens)
    build_seconds = time.perf_counter() - start
    trainable = policy.trainable_parameters()
    adapter_params = sum(p.numel() for p in trainable) + sum(p.numel() for p in _frozen_adapter_parameters(policy))
    base_params = sum(p.numel() for p in policy.transformer.parameters()) - adapter_params
    lora_params = sum(p.numel() for n, p in policy.transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    encoders = tensor_bytes(t for m in (policy.text_encoder, policy.text_encoder_2, policy.codec) for t in [*m.parameters(), *m.buffers()])
    out(f"built in {build_seconds:.1f} s{' (meta device)' if args.count_only else ''}: base {si(base_params)} params "
        f"({base_bytes * base_params / GIB:.2f} GiB), adapters {si(adapter_params)} (LoRA {si(lora_params)}, MoE-LoRA "
        f"{si(adapter_params - lora_params)}; {4 * adapter_params / GIB:.2f} GiB fp32), trainable {si(sum(p.numel() for p in trainable))}; "
        f"text encoders + VAE {encoders / GIB:.3f} GiB (tiny 1-layer text encoders)")

    side, ref_side = args.image_size // 16, args.reference_size // 16
    layout = TokenLayout(args.text_tokens, side * side, (ref_side * ref_side,) * args.references)
    ckpt = not args.no_checkpointing
    forward = forward_flops(policy.transformer, layout, args.batch)
    learner = training_flops(forward, ckpt) * args.window
    executed = executed_training_flops(forward, ckpt) * args.window
    out(f"tokens: text {layout.text} + noisy {layout.noisy} + references {list(layout.references)} = L {layout.total}; FLOP per call "
        f"(batch {args.batch}): {si(forward.total)} = base {si(forward.base)} + LoRA {si(forward.lora)} + MoE-LoRA {si(forward.moe)} + "
        f"attention {si(forward.attention)}")
    out(f"learner, window {args.window}, checkpointing {'on' if ckpt else 'off'}: model FLOP {si(learner.total)} (backward 2x forward"
        f"{', + 1 forward recompute' if ckpt else ''}); executed {si(executed.total)} (the frozen base's backward: input gradients only)")
    result = {"forward_flops": forward, "learner_flops": learner, "executed_flops": executed, "base_params": base_params,
              "adapter_params": adapter_params, "rows": []}
    if args.count_only:
        plan = make_plan(policy, shape, layout, args.batch, args.window, ckpt, base_bytes, encoders, 0)
        out(f"plan ({plan.source}): rollout {_gib(plan.rollout)}, learner fwd+bwd {_gib(plan.learner)}, optimizer step "
            f"{_gib(plan.optimizer_step)}; static during a learner step {_gib(plan.static_learner)}")
        if roofline:
            out(f"at the roofline: rollout call {1e3 * forward.total / (roofline * 1e12):.1f} ms, "
                f"learner fwd+bwd {1e3 * learner.total / (roofline * 1e12):.1f} ms")
        result["plan"] = plan
        return result

    rows = result["rows"]
    rollout, transitions, cond = measure_rollout(policy, args, layout, forward, meter, out)
    rows.append(rollout)
    batch_bytes = tensor_bytes(t for tr in (transitions or ()) for t in (tr.x_t, tr.x_next)) + tensor_bytes(
        (cond.prompt_embeds, cond.pooled_prompt_embeds, cond.reference_tokens))
    plan = make_plan(policy, shape, layout, args.batch, args.window, ckpt, base_bytes, encoders, batch_bytes)
    rollout.plan = plan.rollout
    fwd_bwd = Row(f"learner fwd+bwd (W={args.window}, ckpt {'on' if ckpt else 'off'})", flops=learner.total, executed=executed.total,
                  plan=plan.learner)
    step = Row(f"optimizer step ({args.optimizer})", plan=plan.optimizer_step if args.optimizer == "adamw" else None)
    if transitions is not None:
        measure_learner(policy, args, cond, transitions, meter, fwd_bwd, step)
    rows += [fwd_bwd, step]

    out("")
    out("\n".join(format_table(rows, roofline)))
    out("")
    out(f"memory: {meter.source}; plan: {plan.source}")
    executed_rate = executed.total / fwd_bwd.seconds if fwd_bwd.seconds > 0 else math.nan
    out(f"static during a learner step (weights {base_bytes} B + adapters 4 B + grads 4 B + AdamW 8 B per parameter + text encoders/VAE "
        f"+ batch): {_gib(plan.static_learner)}; learner at executed FLOP: {si(executed_rate)}FLOP/s"
        + (f" ({100 * executed_rate / (roofline * 1e12):.1f}% of the roofline)" if roofline and math.isfinite(executed_rate) else ""))
    if roofline and fp32_peak and not torch.backends.cuda.matmul.allow_tf32 and args.dtype == "bfloat16":
        adapters = forward.lora + forward.moe
        bound = (forward.total - adapters) / roofline + adapters / fp32_peak  # seconds x 1e12
        out(f"mixed bound of the rollout call: bf16 part at {roofline:g} + the fp32 adapters' {si(adapters)}FLOP at {fp32_peak:g} TFLOP/s "
            f"(no TF32) = {1e3 * bound / 1e12:.1f} ms; measured {1e3 * rollout.seconds:.1f} ms")
    if device.type == "cuda":
        out(f"CUDA: reserved peak {torch.cuda.max_memory_reserved(device) / GIB:.2f} GiB of "
            f"{torch.cuda.get_device_properties(device).total_memory / GIB:.1f} GiB (allocator peaks above exclude the CUDA context); "
            f"TF32 for the fp32 adapters {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    result["plan"] = plan
    return result


def measure_rollout(policy: FluxPolicy, args: argparse.Namespace, layout: TokenLayout, forward: Flops, meter: "MemoryMeter",
                    out: Callable[[str], None]):
    """Condition one task (prompt + random references), time warm-up 1 + N rollout steps (model call without grad
    + SDE step with log-prob) and store the window's transitions for the learner."""
    device = policy.device
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    prompts = policy.encode_prompts([PROMPT])
    references = [torch.rand(1, 3, args.reference_size, args.reference_size, generator=generator) for _ in range(args.references)]
    cond = policy.condition(prompts, references, args.image_size, args.image_size)
    synchronize(device)
    out(f"conditioning (tiny text encoders + VAE encode of {args.references} references): {1e3 * (time.perf_counter() - start):.1f} ms")
    if tuple(cond.layout[:3]) != tuple(layout[:3]):
        raise RuntimeError(f"the policy's token layout {cond.layout} differs from the counted one {layout}")
    latent = (args.batch, *policy.latent_shape(args.image_size, args.image_size))
    sigmas = flux_sigmas(16, image_seq_len=layout.noisy).tolist()
    window = range(args.window_start, args.window_start + args.window)
    x = torch.randn(latent, generator=generator).to(device)
    noises = [torch.randn(latent, generator=generator).to(device) for _ in window]
    velocity = policy.velocity_fn(cond)

    def rollout_step(x_t: torch.Tensor, i: int, noise: torch.Tensor) -> WindowTransition:
        with torch.no_grad():
            sigma = torch.full((args.batch,), sigmas[i], device=device)
            step = sde_step_with_logprob(x_t, velocity(x_t, sigma), sigmas[i], sigmas[i + 1], args.eta, noise=noise)
        return WindowTransition(i, sigmas[i], sigmas[i + 1], x_t, step.x_next, step.log_prob, args.eta, "mean")

    row = Row("rollout step (no grad, 1 call)", flops=forward.total, executed=forward.total)
    transitions = None
    try:
        times = []
        for repeat in range(1 + args.steps):
            with meter.peak() as memory:
                seconds, _ = timed(lambda: rollout_step(x, window[0], noises[0]), device)
            if repeat:
                times.append(seconds)
                row.peak = _max(row.peak, memory["peak"])
        row.seconds = statistics.median(times)
        transitions, x_t = [], x
        for i, noise in zip(window, noises):  # the window a rollout stores for the learner
            transitions.append(rollout_step(x_t, i, noise))
            x_t = transitions[-1].x_next
    except oom_types() as error:
        row.note = f"OOM: {str(error).splitlines()[0][:80]}"
    return row, transitions, cond


def measure_learner(policy: FluxPolicy, args: argparse.Namespace, cond, transitions: Sequence[WindowTransition], meter: "MemoryMeter",
                    fwd_bwd: Row, step: Row) -> None:
    """Warm-up 1 + N learner steps: the window's log-probs under the policy with grad (window_log_probs), the GSPO
    objective and its backward (timed), then apply_step (clip + AdamW, timed apart). Fills the two rows."""
    device = policy.device
    cfg = LearnerConfig()
    if not args.no_checkpointing:
        policy.enable_block_checkpointing()
    trainable = policy.trainable_parameters()
    optimizer = make_optimizer(trainable, cfg) if args.optimizer == "adamw" else None
    advantages = torch.ones(args.batch, device=device)
    logp_old = torch.stack([t.log_prob for t in transitions], 1)

    def forward_backward() -> float:
        new = window_log_probs(policy.velocity_fn(cond), transitions)
        objective = gspo_objective(new.log_probs, logp_old, advantages, cfg.clip_low, cfg.clip_high)
        objective.loss.backward()
        return float((objective.ratio.double() - 1).abs().max())

    times, step_times = [], []
    failing = fwd_bwd  # the row an out-of-memory error is reported on
    try:
        for repeat in range(1 + args.steps):
            policy.zero_grad(set_to_none=True)
            failing = fwd_bwd
            with meter.peak() as memory:
                seconds, deviation = timed(forward_backward, device)
            if repeat == 0:
                fwd_bwd.note = f"first (on-policy) step: |ratio - 1| = {deviation:.1e}"
            else:
                times.append(seconds)
                fwd_bwd.peak = _max(fwd_bwd.peak, memory["peak"])
            if optimizer is not None:
                failing = step
                with meter.peak() as memory:
                    seconds, outcome = timed(lambda: apply_step(optimizer, cfg.max_grad_norm, loss_finite=True), device)
                if repeat:
                    step_times.append(seconds)
                    step.peak = _max(step.peak, memory["peak"])
                    step.note = f"grad norm {outcome.grad_norm:.2e}"
    except oom_types() as error:
        failing.note = f"OOM{' (creating AdamW state)' if failing is step and not step_times else ''}: {str(error).splitlines()[0][:80]}"
    fwd_bwd.seconds = statistics.median(times) if times else math.nan
    step.seconds = statistics.median(step_times) if step_times else math.nan
    if optimizer is not None:
        state = tensor_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        step.note += f"; AdamW state {state / GIB:.2f} GiB"
    policy.zero_grad(set_to_none=True)


def si(value: float, unit: str = "") -> str:
    """1.23e13 -> '12.30 T' (SI prefixes; '-' for nan)."""
    if not math.isfinite(value):
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def _max(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


# ---- command line -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="flux-dev on CUDA, cpu-small on the CPU by default")
    parser.add_argument("--cpu-small", action="store_const", const="cpu-small", dest="preset", help="--preset cpu-small")
    parser.add_argument("--width-scale", type=float, default=1.0, help="scale the head count (and the adapter rank) of the preset")
    for flag in ("layers", "single-layers", "heads", "head-dim", "text-dim", "pooled-dim", "rank", "image-size", "reference-size",
                 "text-tokens", "steps"):
        parser.add_argument(f"--{flag}", type=int, help="default: the preset's")
    parser.add_argument("--references", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=2, help="learner window W (sampler.window_size)")
    parser.add_argument("--window-start", type=int, default=0)
    parser.add_argument("--eta", type=float, default=0.9)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 roofline; detected for A100 / H100 / H200")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=("adamw", "none"), default="adamw")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for the fp32 adapter matmuls (CUDA)")
    parser.add_argument("--count-only", action="store_true", help="build on the meta device: shapes, FLOPs and the plan only")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here: run on the CPU at reduced width (--device cpu, the cpu-small preset)")
    if args.preset is None:
        args.preset = "flux-dev" if str(args.device).startswith("cuda") else "cpu-small"
    preset = PRESETS[args.preset]
    heads = args.heads if args.heads is not None else max(1, round(preset.num_attention_heads * args.width_scale))
    defaults = dict(layers=preset.num_layers, single_layers=preset.num_single_layers, head_dim=preset.attention_head_dim,
                    text_dim=preset.joint_attention_dim, pooled_dim=preset.pooled_projection_dim, image_size=preset.image_size,
                    reference_size=preset.reference_size, text_tokens=preset.text_tokens, steps=preset.steps)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.heads = heads
    if args.rank is None:
        args.rank = max(2, round(preset.rank * heads * args.head_dim / (preset.num_attention_heads * preset.attention_head_dim)))
    for key in ("image_size", "reference_size"):
        if getattr(args, key) % 16:
            parser.error(f"--{key.replace('_', '-')} must be a multiple of 16 (VAE factor 8 x 2x2 packing)")
    if args.steps < 1 or args.window < 1:
        parser.error("--steps and --window must be >= 1")
    if args.window_start + args.window > 16:
        parser.error("the window must lie in the 16-step schedule")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not str(args.device).startswith("cuda"):
        print("no GPU used: running on the CPU" + (" at reduced width" if args.preset == "cpu-small" else ""))
    torch.manual_seed(0)
    run(args, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
