"""Peak memory and time of one policy training step with reference attention-map capture (chunked fp32
rows under checkpointing) versus no capture, and versus a naive capture that materializes the full
(B, H, L, L) attention, on a FLUX-shaped model (FLUX.1's attention geometry: 24 heads of 128, RoPE axes
16/56/56, 512 T5 tokens) at 512x512 with two references.

Each variant runs in its own subprocess so the CPU peak (ru_maxrss) belongs to that variant alone; on
CUDA the allocator's peak is used. Memory is the step's peak above what was resident before the step
(weights, optimizer state and inputs are the same for every variant), plus the absolute peak.

    python benchmarks/policy_attention_capture.py                 # CPU, FLUX-shaped, 2 double + 1 single block
    python benchmarks/policy_attention_capture.py --device cuda --dtype bfloat16 --double-blocks 19 --single-blocks 38
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("none", "chunked", "full")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from policies import AttentionConfig, AttentionSwitches, FluxPolicy, LoRAConfig, PolicyConfig, TinyFluxConfig, dice_loss

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = TinyFluxConfig(
        num_layers=args.double_blocks,
        num_single_layers=args.single_blocks,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        axes_dims_rope=(16, 56, 56) if args.head_dim == 128 else (args.head_dim // 4, 3 * args.head_dim // 8, 3 * args.head_dim // 8),
        joint_attention_dim=args.text_dim,
        pooled_projection_dim=768,
        vae_scale_factor=8,  # FLUX's 8x latent grid: 512 px -> 64x64 latents -> 32x32 = 1024 tokens
        t5_max_length=args.text_tokens,
    )
    policy = FluxPolicy.from_config(
        PolicyConfig(
            tiny=shape, dtype=args.dtype, lora=LoRAConfig(rank=16, alpha=16.0),
            attention=AttentionConfig(capture_chunk_rows=args.chunk_rows),
        )
    ).to(device)
    generator = torch.Generator().manual_seed(0)
    references = [torch.rand(1, 3, args.reference_size, args.reference_size, generator=generator) for _ in range(2)]
    prompts = policy.encode_prompts(["a cat and a dog playing on the grass"], item_phrases=["a cat", "a dog"])
    cond = policy.condition(prompts, references, args.size, args.size)
    x0 = torch.randn(1, *policy.latent_shape(args.size, args.size), generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigma = torch.tensor([0.6], device=device)
    x_t = (1 - sigma) * x0 + sigma * noise
    masks = (torch.rand(1, 2, cond.layout.noisy, generator=generator) > 0.7).float().to(device)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    switches = AttentionSwitches(capture=args.variant != "none", capture_method="full" if args.variant == "full" else "chunked")

    def step() -> None:
        out = policy(x_t, sigma, cond, switches)
        loss = (out.velocity - (noise - x0)).pow(2).mean()
        if out.attention_maps is not None:
            loss = loss + 0.3 * dice_loss(out.attention_maps, masks)  # MultiCrafter Eq. 6, lambda = 0.3
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # AdamW allocates its state on the first step: take one zero-gradient step so that state is resident
    # before measuring (the same for every variant, and no forward pass has set the peak yet).
    for p in policy.trainable_parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    wall, cpu = [], []
    for _ in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": args.variant,
        "sequence": cond.layout._asdict(),
        "step_peak_bytes": peak - before,
        "peak_bytes": peak,
        "seconds": min(wall),
        "cpu_seconds": min(cpu),  # all threads' CPU time: steadier than wall time on a shared machine
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="target image side in pixels")
    parser.add_argument("--reference-size", type=int, default=512, help="side of each of the two reference images")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--text-dim", type=int, default=4096, help="T5 hidden size (joint_attention_dim)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--double-blocks", type=int, default=2)
    parser.add_argument("--single-blocks", type=int, default=1)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (the minimum is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="base weights (adapters stay fp32)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a subprocess
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    forwarded = sys.argv[1:]
    results = {}
    for variant in VARIANTS:
        completed = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *forwarded, "--variant", variant],
            check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
        )
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])

    layout = results["none"]["sequence"]
    print(
        f"policy training step, {args.size}x{args.size} with two {args.reference_size}px references on {args.device} ({args.dtype}): "
        f"{args.double_blocks} double + {args.single_blocks} single blocks, {args.heads} heads x {args.head_dim}; "
        f"sequence text {layout['text']} + noisy {layout['noisy']} + references {layout['references']}"
    )
    gib = 1024**3
    print(f"{'capture':<10}{'step peak GiB':>15}{'total peak GiB':>16}{'wall s':>10}{'cpu s':>10}")
    for variant in VARIANTS:
        r = results[variant]
        print(f"{variant:<10}{r['step_peak_bytes'] / gib:>15.3f}{r['peak_bytes'] / gib:>16.3f}{r['seconds']:>10.2f}{r['cpu_seconds']:>10.2f}")

    def ratios(a: dict, b: dict) -> str:
        return (f"step peak x{a['step_peak_bytes'] / b['step_peak_bytes']:.3f}, total peak x{a['peak_bytes'] / b['peak_bytes']:.3f}, "
                f"wall x{a['seconds'] / b['seconds']:.3f}, cpu x{a['cpu_seconds'] / b['cpu_seconds']:.3f}")

    none, chunked, full = (results[v] for v in VARIANTS)
    print(f"chunked / none: {ratios(chunked, none)}")
    print(f"full / none:    {ratios(full, none)}")
    print(f"full / chunked: {ratios(full, chunked)}")
    extra = chunked["step_peak_bytes"] / none["step_peak_bytes"] - 1
    print(f"capture costs {100 * extra:+.1f}% step peak memory over no capture (target: at most +15%)")


if __name__ == "__main__":
    main()
