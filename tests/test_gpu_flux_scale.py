"""benchmarks/gpu_flux_scale.py: the CPU reduced-width run prints its table, and the FLOP counter matches hand
counts (linear 2 d_in d_out S, attention 4 L^2 d, backward 2 x forward, checkpointing one more forward)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from policies import TokenLayout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    name = "gpu_flux_scale_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "gpu_flux_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def tiny_policy(bench, double=1, single=1, heads=2, head_dim=16, text_dim=24, pooled_dim=20, rank=4):
    shape = bench.flux_shape(double, single, heads, head_dim, text_dim, pooled_dim)
    preset = bench.Preset(double, single, heads, head_dim, text_dim, pooled_dim, rank, 64, 32, 8, (32, 32, 32, 32), 1, 1)
    cfg = bench.policy_config(rank, "float32", shape, text_tokens=8)
    return bench.build_policy(cfg, shape, preset, torch.device("cpu"), text_tokens=8), shape


def test_cpu_small_run_completes_and_prints_the_table(bench, capsys):
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            assert bench.main(["--cpu-small", "--device", "cpu", "--threads", "1", "--steps", "1", "--layers", "1", "--single-layers", "1",
                               "--text-tokens", "16", "--image-size", "64", "--reference-size", "32"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "no GPU used: running on the CPU at reduced width"
    header = next(i for i, line in enumerate(lines) if line.startswith("measurement"))
    rows = {line[:34].strip(): line[34:].split() for line in lines[header + 2 : header + 5]}
    assert set(rows) == {"rollout step (no grad, 1 call)", "learner fwd+bwd (W=2, ckpt on)", "optimizer step (adamw)"}, lines
    for name, fields in rows.items():
        assert math.isfinite(float(fields[0])) and float(fields[0]) > 0, (name, fields)  # time ms
    for name in ("rollout step (no grad, 1 call)", "learner fwd+bwd (W=2, ckpt on)"):
        value, unit = rows[name][1], rows[name][2]  # FLOP count, e.g. "405.25 M"
        assert float(value) > 0 and unit in ("k", "M", "G", "T"), rows[name]
    assert "first (on-policy) step: |ratio - 1|" in lines[header + 3]
    assert any(line.startswith("tokens: text 16 + noisy 16 + references [4, 4] = L 40") for line in lines), lines


def test_flop_primitives_match_hand_counts(bench):
    assert bench.linear_flops(3, 5, 7) == 2 * 3 * 5 * 7
    assert bench.lora_flops(10, 6, 2, 3) == 2 * 3 * (10 * 2 + 2 * 6)
    assert bench.moe_lora_flops(10, 6, 2, 4, 1, 3) == 2 * 3 * (10 * 4 + 10 * 2 + 2 * 6)  # gate + one expert
    assert bench.moe_lora_flops(10, 6, 2, 4, 2, 3) == 2 * 3 * (10 * 4 + 2 * (10 * 2 + 2 * 6))
    assert bench.attention_flops(10, 8) == 4 * 10 * 10 * 8  # QK^T and AV, 2 L^2 d each
    forward = bench.Flops(base=1.0, lora=2.0, moe=3.0, attention=4.0)
    assert bench.training_flops(forward, checkpointing=False).total == 3 * 10  # forward + backward (2 x)
    assert bench.training_flops(forward, checkpointing=True).total == 4 * 10  # + the recomputed forward
    executed = bench.executed_training_flops(forward, checkpointing=True)  # frozen base: input gradients only
    assert (executed.base, executed.lora, executed.moe, executed.attention) == (3.0, 8.0, 12.0, 16.0)


def test_forward_flops_match_a_hand_count_of_a_tiny_flux(bench):
    policy, shape = tiny_policy(bench)
    d, m, c, e, k, r = shape.width, 4 * shape.width, shape.in_channels, 4, 1, 4
    text, noisy, refs = 8, 16, (4, 9)
    image = noisy + sum(refs)
    length = text + image
    layout = TokenLayout(text, noisy, refs)
    # frozen base, per token (multiply-adds): embedders and output on their streams, conditioning vectors once
    base = c * d * image + shape.joint_attention_dim * d * text + d * c * image
    base += (256 * d + d * d) * 2 + (shape.pooled_projection_dim * d + d * d) + d * 2 * d  # time, guidance, pooled; norm_out
    base += 2 * d * 6 * d + (4 * d * d + 2 * d * m) * (image + text)  # double block: AdaLN x 2, attention + FFN per stream
    base += d * 3 * d + (3 * d * d + d * m + (d + m) * d) * length  # single block: AdaLN, q k v, proj_mlp, proj_out
    # LoRA r on the attention projections of both streams, the FFN inputs and proj_mlp
    lora = r * (4 * 2 * d + (d + m)) * (image + text) + r * (3 * 2 * d + (d + m)) * length
    # MoE-LoRA: gate + top-1 expert on ff.net.2 / ff_context.net.2 (m -> d) and the single block's proj_out (d + m -> d)
    moe = (m * e + k * r * (m + d)) * (image + text) + ((d + m) * e + k * r * (d + m + d)) * length
    attention = 2 * 4 * length**2 * d  # one double and one single block
    flops = bench.forward_flops(policy.transformer, layout)
    assert flops.base == 2 * base
    assert flops.lora == 2 * lora
    assert flops.moe == 2 * moe
    assert flops.attention == attention
    assert bench.forward_flops(policy.transformer, layout, batch=3).total == 3 * flops.total


def test_the_token_rule_matches_the_rows_every_linear_sees_in_a_call(bench):
    from policies.adapters import MoELoRALinear

    policy, _ = tiny_policy(bench)
    prompts = policy.encode_prompts(["a cat and a dog"])
    references = [torch.rand(1, 3, 32, 32), torch.rand(1, 3, 48, 48)]
    cond = policy.condition(prompts, references, 64, 64)
    seen = {}

    def hook(path):
        def record(module, args):
            features = module.in_features if isinstance(module, torch.nn.Linear) else module.base.in_features
            seen[path] = args[0].numel() // features
        return record

    modules = [(p, m) for p, m in policy.transformer.named_modules() if isinstance(m, (torch.nn.Linear, MoELoRALinear))]
    handles = [m.register_forward_pre_hook(hook(p)) for p, m in modules]
    with torch.no_grad():
        policy(torch.randn(2, *policy.latent_shape(64, 64)), torch.tensor([0.5, 0.7]), cond)
    for handle in handles:
        handle.remove()
    assert set(seen) == {p for p, _ in modules}  # every linear ran
    for path, rows in seen.items():
        layer, _ = bench._strip_adapter(path)
        assert rows == 2 * bench.linear_tokens(layer, cond.layout), path
