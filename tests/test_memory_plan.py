"""benchmarks/memory_plan.py: exact parameter counts on the meta device, the activation model against what autograd
really saves, and the plan end to end. Nothing FLUX-sized is allocated (FLUX.1-dev shapes exist on the meta device
only; real models are a few blocks of width 64)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
from diffusers import FluxTransformer2DModel

ROOT = Path(__file__).resolve().parents[1]
MULTICRAFTER = "configs/ippo_multi_human.yaml"


def _load_script():
    spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "benchmarks" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mp = _load_script()

# FLUX-shaped, small: 1 double + 1 single block, 2 heads of 32 (width 64)
SMALL = mp.FluxShape(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
                     joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 14, 14))


def _policy_cfg(config: str, shape=SMALL):
    policy_cfg, _ = mp._case_policy(mp.Case("", config, "train"), shape)
    return policy_cfg


@pytest.fixture(scope="module")
def flux_dev_multicrafter():
    """The MultiCrafter preset's policy on FLUX.1-dev, built on the meta device."""
    _, cfg = mp._load(str(ROOT / MULTICRAFTER))
    return mp.count_parameters(mp.build_policy(cfg.policy))


@pytest.mark.parametrize("config", [MULTICRAFTER, "configs/sft/musar_diptych.yaml", "configs/sft/one_for_all_position_id.yaml"])
def test_meta_count_equals_the_real_models_count(config):
    policy_cfg = _policy_cfg(str(ROOT / config))
    meta = mp.count_parameters(mp.build_policy(policy_cfg, SMALL))
    real_policy = mp.build_policy(policy_cfg, SMALL, device="cpu")
    assert all(p.device.type == "cpu" for p in real_policy.parameters())
    real = mp.count_parameters(real_policy)
    bare = FluxTransformer2DModel(**SMALL.kwargs())
    assert meta.base == real.base == sum(p.numel() for p in bare.parameters())
    assert meta.adapters == real.adapters == sum(p.numel() for p in real_policy.parameters()) - real.base
    assert meta.trainable == real.trainable == sum(p.numel() for p in real_policy.parameters() if p.requires_grad)
    assert meta.adapters > 0
    block = sum(p.numel() for p in bare.transformer_blocks[0].parameters())  # a double block is the largest
    adapted = list(real_policy.transformer.transformer_blocks[0].parameters())
    assert meta.largest_block == real.largest_block == (
        block, sum(p.numel() for p in adapted) - block, sum(p.numel() for p in adapted if p.requires_grad))
    assert {name: dataclasses.astuple(g) for name, g in meta.groups.items()} == {name: dataclasses.astuple(g) for name, g in real.groups.items()}


def test_lora_count_is_rank_times_in_plus_out_for_each_layer():
    assert mp.lora_params(3072, 3072, 512) == 3_145_728  # DESIGN.md: 3.1M per 3072x3072 projection
    assert mp.lora_params(12288, 3072, 512) == 7_864_320  # an expert on ff.net.2: 7.9M
    assert mp.lora_params(15360, 3072, 512) == 9_437_184  # an expert on a single block's proj_out: 9.4M
    assert mp.moe_lora_params(12288, 3072, 512, 4) == 4 * 7_864_320 + 4 * 12288  # plus the gate
    policy = mp.build_policy(_policy_cfg(str(ROOT / MULTICRAFTER)), SMALL, device="cpu")
    layer = policy.transformer.get_submodule("transformer_blocks.0.attn.to_q")
    (rank,) = layer.r.values()
    own = sum(p.numel() for name, p in layer.named_parameters() if name.startswith("lora_"))
    assert own == mp.lora_params(layer.in_features, layer.out_features, rank) == rank * (64 + 64)
    ffn = policy.transformer.get_submodule("transformer_blocks.0.ff.net.0.proj")  # d_in 64 -> d_out 256: asymmetric
    assert sum(p.numel() for name, p in ffn.named_parameters() if name.startswith("lora_")) == rank * (64 + 256)
    for linear in mp.adapted_linears(policy):
        assert linear.params == linear.formula_params, linear.path


def test_multicrafter_preset_adapts_the_expected_layers(flux_dev_multicrafter):
    count = flux_dev_multicrafter
    assert count.layers_of("lora") == 19 * (8 + 2) + 38 * (3 + 1)  # attention + FFN input; attention + proj_mlp
    assert count.layers_of("moe") == 19 * 2 + 38  # ff.net.2, ff_context.net.2; single blocks' proj_out
    layers = {name: group.layers for name, group in count.groups.items()}
    assert layers == {
        "LoRA attention projections (double blocks)": 19 * 8, "LoRA attention projections (single blocks)": 38 * 3,
        "LoRA FFN input ff.net.0.proj + ff_context.net.0.proj": 19 * 2, "LoRA single blocks' proj_mlp": 38,
        "MoE-LoRA experts on ff.net.2": 19, "MoE-LoRA experts on ff_context.net.2": 19,
        "MoE-LoRA experts on single blocks' proj_out": 38, "MoE-LoRA gates (all MoE layers)": 76,
    }
    assert count.base == 11_901_408_320  # FLUX.1-dev's transformer
    lora, r = mp.lora_params, 512
    expected = (19 * 8 + 38 * 3) * lora(3072, 3072, r) + (19 * 2 + 38) * lora(3072, 12288, r) \
        + 19 * 2 * (4 * lora(12288, 3072, r) + 4 * 12288) + 38 * (4 * lora(15360, 3072, r) + 4 * 15360)
    assert count.adapters == count.trainable == expected == 4_068_483_072
    assert all(group.params == group.formula for group in count.groups.values())


@pytest.mark.parametrize("case", [
    mp.Case("bf16 base, LoRA + MoE, window 2", MULTICRAFTER, "train", image_size=128, reference_size=64),
    mp.Case("fp32 base: shared inputs", MULTICRAFTER, "train", dtype="float32", forwards=1, image_size=128, reference_size=64),
    mp.Case("dual-branch, batch 2", "configs/sft/musar_diptych.yaml", "train", batch=2, forwards=1, image_size=128, reference_size=64),
], ids=lambda case: case.name)
def test_activation_model_matches_what_autograd_saves(case):
    case = dataclasses.replace(case, config=str(ROOT / case.config))
    predicted = mp.predict_case(case, SMALL)["saved"]
    tally = mp.measure_case(case, SMALL, peak=False)["tally"]
    assert tally > 0
    # CPU LayerNorm keeps bf16 statistics where CUDA keeps fp32 ones: a few bytes per token
    assert abs(predicted / tally - 1) < 0.02, (predicted, tally)


def test_checkpointing_keeps_block_inputs_only(flux_dev_multicrafter):
    tokens = mp.Tokens.of(512, 512, 320, 2)
    assert tokens.total == 512 + 1024 + 2 * 400
    act = mp.training_activations(mp.FLUX_DEV_SHAPE, flux_dev_multicrafter, tokens, 2, batch=1, forwards=2)
    inputs = 2 * 3072 * tokens.total * (19 + 38)  # bf16 hidden states entering each block, per forward
    rope, per_sample = mp.outside_saved_bytes(mp.FLUX_DEV_SHAPE, tokens, 2)
    assert act.checkpointing == pytest.approx(2 * (inputs + rope + per_sample) + (1 + mp.BACKWARD_WORKING_SET) * act.largest)
    assert act.no_checkpointing > 10 * act.checkpointing
    twice = mp.training_activations(mp.FLUX_DEV_SHAPE, flux_dev_multicrafter, tokens, 2, batch=2, forwards=2)
    assert twice.no_checkpointing == pytest.approx(2 * act.no_checkpointing - 2 * rope, rel=1e-9)  # RoPE tables are shared


def _line(plan, role, prefix):
    (line,) = [line for line in plan.lines if line.role == role and line.component.startswith(prefix)]
    return line


def test_plan_divides_the_sharded_state_by_the_learners(flux_dev_multicrafter):
    path = str(ROOT / MULTICRAFTER)
    plain = mp.plan_preset(path, mp.Options(overrides=("learner.sharding=replicate",)))
    sharded = mp.plan_preset(path, mp.Options())  # the preset: learner.sharding fsdp
    assert mp.plan_preset(path, mp.Options(overrides=("learner.sharding=replicate",), shard_base=True, shard_adapters=True)).lines == sharded.lines
    trainable, base = flux_dev_multicrafter.trainable, flux_dev_multicrafter.base
    assert _line(plain, "learner", "base weights").no_ckpt == 2 * base  # the preset's policy.dtype is bfloat16
    assert _line(sharded, "learner", "base weights").no_ckpt == 2 * base / 16
    assert _line(sharded, "rollout", "base weights").no_ckpt == 2 * base  # rollout workers hold a whole copy
    assert _line(plain, "learner", "gradients").no_ckpt == 4 * trainable
    assert _line(plain, "learner", "AdamW").no_ckpt == 8 * trainable
    assert _line(sharded, "learner", "AdamW").no_ckpt == 8 * trainable / 16
    block_base, block_adapters, block_trainable = flux_dev_multicrafter.largest_block
    assert _line(sharded, "learner", "FSDP").no_ckpt == 2 * (2 * block_base + 4 * block_adapters) + 4 * block_trainable
    assert not [line for line in plain.lines if line.component.startswith("FSDP")]
    (label,) = plain.per_gpu  # shares 0.45 + 0.4 + 0.15 = 1: one of each per GPU
    assert label == "learner + rollout + reward"
    assert plain.per_gpu[label][0] == pytest.approx(sum(mp._peak(plain.lines, role)[0] for role in ("learner", "rollout", "reward")))


def test_script_runs_end_to_end_and_gives_a_verdict(capsys):
    assert mp.main(["--config", MULTICRAFTER, "--gpu-gb", "1", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "== configs/ippo_multi_human.yaml ==" in out
    for row in ("learner      activations (fwd + bwd)", "rollout      base weights", "reward       HPSv2", "per GPU      learner + rollout + reward"):
        assert row in out, row
    verdict = [line for line in out.splitlines() if line.startswith("verdict")]
    assert len(verdict) == 1 and verdict[0].count("DOES NOT FIT") == 2, verdict
    assert "MoE-LoRA experts on single blocks' proj_out                  38" in out
    (configured,) = [line for line in out.splitlines() if line.startswith("as configured")]
    assert "with block checkpointing" in configured and configured.endswith(" DOES NOT FIT")
    assert mp.main(["--config", MULTICRAFTER, "--gpu-gb", "100000", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("verdict")][0].split()[-2:] == ["FITS", "FITS"]


@pytest.mark.parametrize("config", ["configs/ippo_multi_human.yaml", "configs/ippo_multi_object.yaml"])
def test_the_ippo_presets_fit_16_gpus_of_80_gib_as_configured(config):
    plan = mp.plan_preset(str(ROOT / config), mp.Options())
    assert plan.column == 1 and plan.fits  # sharded learners with block checkpointing
    (label,) = plan.per_gpu
    assert label == "learner + rollout + reward" and plan.per_gpu[label][1] <= 80 * mp.GIB
    assert not mp.plan_preset(str(ROOT / config), mp.Options(overrides=("learner.sharding=replicate",))).fits
    assert not mp.plan_preset(str(ROOT / config), mp.Options(overrides=("learner.checkpoint_blocks=false",))).fits


@pytest.mark.parametrize("config", mp.SFT_PRESETS)
def test_the_sft_presets_fit_8_gpus_of_80_gib_as_configured(config):
    plan = mp.plan_preset(str(ROOT / config), mp.Options())
    assert plan.column == 1 and plan.fits and _line(plan, "SFT process", "base weights").component.endswith("sharded / 8)")
    unchecked = mp.plan_preset(str(ROOT / config), mp.Options(overrides=("checkpoint_blocks=false",)))
    assert unchecked.column == 0 and unchecked.per_gpu["one SFT process"][0] > 1.2 * plan.per_gpu["one SFT process"][1]
