"""How much a rollout step costs in sampler arithmetic compared with the model forward.

For a FLUX-shaped diffusers FluxTransformer2DModel (random init), times side by side, interleaved over
rounds: one transformer forward, one SDE step with its log-prob (including the keyed per-sample noise),
and one Euler step, at the same latent shape. Prints the medians and the ratios sampler / forward (they
should be a few percent at most).

    python benchmarks/sampler_overhead.py                      # tiny model, CPU
    python benchmarks/sampler_overhead.py --preset flux --device cuda --dtype bfloat16 --resolution 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel

from samplers import euler_step, flux_sigmas, sde_noise, sde_step_with_logprob

PRESETS = {
    # 2 double + 2 single blocks, 2 heads of dim 16: the shape of the tiny test preset.
    "tiny": dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    # FLUX.1-dev: 19 double + 38 single blocks, 24 heads of dim 128 (about 12B parameters).
    "flux": dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56), guidance_embeds=True),
}


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--num-layers", type=int, help="override the number of double blocks (and single = 2x)")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (8x VAE, 2x2 packing)")
    parser.add_argument("--batch", type=int, default=4, help="samples per forward (one group chunk)")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = dict(PRESETS[args.preset])
    if args.num_layers is not None:
        config.update(num_layers=args.num_layers, num_single_layers=2 * args.num_layers)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # build in the target dtype: a 12B model never exists in fp32
    with torch.device(device):
        model = FluxTransformer2DModel(in_channels=64, **config).eval()
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())

    side = args.resolution // 16  # 8x VAE downsampling, then 2x2 patches
    tokens, batch = side * side, args.batch
    latents = torch.randn(batch, tokens, 64, device=device)
    text = torch.randn(batch, args.text_tokens, config["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype)
    img_ids = torch.zeros(tokens, 3, device=device)
    img_ids[:, 1] = torch.arange(side, device=device).repeat_interleave(side)
    img_ids[:, 2] = torch.arange(side, device=device).repeat(side)
    txt_ids = torch.zeros(args.text_tokens, 3, device=device)
    sigmas = flux_sigmas(16, tokens)
    sigma, sigma_next = float(sigmas[3]), float(sigmas[4])
    timestep = torch.full((batch,), sigma, device=device)
    guidance = torch.full((batch,), 3.5, device=device) if config.get("guidance_embeds") else None

    @torch.no_grad()
    def forward():
        return model(
            hidden_states=latents.to(dtype), encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
            img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False,
        )[0]

    v = forward().float()

    def sde():
        noise = sde_noise(0, 0, 0, range(batch), 3, (tokens, 64), device)
        return sde_step_with_logprob(latents, v, sigma, sigma_next, 0.7, noise=noise)

    def euler():
        return euler_step(latents, v, sigma, sigma_next)

    for fn in (forward, sde, euler):  # warm-up
        _timed(fn, device)
    times = {"forward": [], "sde step + noise": [], "euler step": []}
    for _ in range(args.rounds):
        times["forward"].append(_timed(forward, device))
        times["sde step + noise"].append(_timed(sde, device))
        times["euler step"].append(_timed(euler, device))
    medians = {name: statistics.median(values) for name, values in times.items()}

    print(f"model: {args.preset} ({params / 1e6:.1f}M params, {args.dtype}) on {device}; batch {batch} x {tokens} tokens "
          f"({args.resolution}px); median of {args.rounds} interleaved rounds")
    for name, seconds in medians.items():
        print(f"  {name:<18} {seconds * 1e3:9.3f} ms")
    print(f"ratio sde step / forward:   {medians['sde step + noise'] / medians['forward']:.2%}")
    print(f"ratio euler step / forward: {medians['euler step'] / medians['forward']:.2%}")


if __name__ == "__main__":
    main()
