"""Dense vs sparse top-k dispatch of one MoE-LoRA layer (MultiCrafter Sec. 4.3), by default on CPU.

Dense is the previous formula: every expert's LoRA for every token (einsums), multiplied by the
top-k-masked gate weights. Sparse is what MoELoRALinear runs now (moe_lora_delta): only each token's
chosen experts. Both use the same parameters and input; they are timed side by side, interleaved over
rounds, for the adapter alone (gate + delta) and for the whole layer (frozen base W h + adapter), forward
alone and forward + backward (gradients for the input, the gate, A and B, as inside a model). Prints the
medians and the ratios dense / sparse, plus how the tokens were routed and how far the results differ.

    python benchmarks/moe_lora_dispatch.py                       # 3072 -> 3072, 4 experts, top-1, r512, 1024 tokens
    python benchmarks/moe_lora_dispatch.py --in-features 12288   # the FFN output shape (double-block ff.net.2)
    python benchmarks/moe_lora_dispatch.py --skew 0.6 --top-k 2 --threads 0   # uneven routing, torch's threads

On a busy machine several threads mostly measure the scheduler (each of the sparse path's smaller ops is
one more parallel region to wait on), hence one thread by default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from policies import MoELoRAConfig
from policies.adapters import ForwardContext, MoELoRALinear, moe_gate_weights, moe_lora_delta


def dense_delta(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The previous implementation: x (B, S, d_in) fp32 -> (B, S, d_out)."""
    weights = moe_gate_weights(layer.gate(x), layer.top_k)  # (B, S, N_e)
    down = torch.einsum("bsi,eri->bser", x, layer.lora_A) * weights[..., None]
    return torch.einsum("bser,eor->bso", down, layer.lora_B) * layer.scaling


def sparse_delta(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    logits = layer.gate(x)  # (B, S, N_e)
    experts = logits.topk(layer.top_k, dim=-1).indices
    return moe_lora_delta(x, moe_gate_weights(logits, layer.top_k), experts, layer.lora_A, layer.lora_B, layer.scaling)


def dense_layer(layer: MoELoRALinear, hidden: torch.Tensor) -> torch.Tensor:
    return layer.base(hidden) + dense_delta(layer, hidden)


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
    parser.add_argument("--in-features", type=int, default=3072, help="12288 for the FFN output layer ff.net.2")
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the one sample")
    parser.add_argument("--skew", type=float, default=0.0, help="fraction of tokens pushed to expert 0 (0: the random gate's own, roughly even routing)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, 0 for torch's default; 1 so that a shared machine measures the arithmetic, not the thread scheduling")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = MoELoRAConfig(enabled=True, num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=float(args.rank))
    with torch.device(device):
        layer = MoELoRALinear(torch.nn.Linear(args.in_features, args.out_features), cfg, ForwardContext())
        layer.base.requires_grad_(False)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.02)  # nonzero, as after some training
        hidden = torch.randn(1, args.tokens, args.in_features)
        pushed = torch.rand(args.tokens) < args.skew
        gate_0 = layer.gate.weight[0].detach()
        hidden[0, pushed] += 10.0 * gate_0 / gate_0.norm()  # raises expert 0's logit by ~6 std on those tokens
        hidden.requires_grad_()
        cotangent = torch.randn(1, args.tokens, args.out_features)
    wrt = [hidden, layer.gate.weight, layer.lora_A, layer.lora_B]

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(layer, hidden)
        return run

    def forward_backward(fn):
        def run():
            return torch.autograd.grad(fn(layer, hidden), wrt, cotangent)
        return run

    def layer_forward(module, x):
        return module(x)

    cases = {
        "adapter forward": (forward(dense_delta), forward(sparse_delta)),
        "adapter forward+backward": (forward_backward(dense_delta), forward_backward(sparse_delta)),
        "layer forward": (forward(dense_layer), forward(layer_forward)),
        "layer forward+backward": (forward_backward(dense_layer), forward_backward(layer_forward)),
    }

    # The check that both compute the same thing doubles as the layer's warm-up; then the adapter's.
    with torch.no_grad():
        difference = (dense_layer(layer, hidden) - layer(hidden)).abs().max().item()
        counts = torch.bincount(layer.gate(hidden).topk(args.top_k, dim=-1).indices.flatten(), minlength=args.experts)
    grads_dense, grads_sparse = cases["layer forward+backward"][0](), cases["layer forward+backward"][1]()
    grad_difference = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads_dense, grads_sparse))
    for dense_fn, sparse_fn in (cases["adapter forward"], cases["adapter forward+backward"]):
        _timed(dense_fn, device)
        _timed(sparse_fn, device)

    times = {name: ([], []) for name in cases}
    for _ in range(args.rounds):
        for name, (dense_fn, sparse_fn) in cases.items():
            times[name][0].append(_timed(dense_fn, device))
            times[name][1].append(_timed(sparse_fn, device))

    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"MoE-LoRA layer {args.in_features} -> {args.out_features}, {args.experts} experts, top-{args.top_k}, rank {args.rank}, "
          f"{args.tokens} tokens, fp32 on {device}{threads}; median of {args.rounds} interleaved rounds")
    print(f"tokens per expert: {counts.tolist()}; max |dense - sparse| output {difference:.2e}, gradients (relative) {grad_difference:.2e}")
    print(f"  {'':<26} {'dense ms':>10} {'sparse ms':>10} {'dense / sparse':>15}")
    for name, (dense_times, sparse_times) in times.items():
        dense, sparse = statistics.median(dense_times), statistics.median(sparse_times)
        print(f"  {name:<26} {dense * 1e3:10.1f} {sparse * 1e3:10.1f} {dense / sparse:14.2f}x")


if __name__ == "__main__":
    main()
