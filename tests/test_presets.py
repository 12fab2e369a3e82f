"""Each paper preset, loaded with the project's loader (and, for warm-start stages, the policy the stage
trains), carries the numbers its paper states: a table per paper written out here from the paper's text
(shared/papers/), so a preset can no longer drift from its paper. Values a paper does not give are not in
the tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer

from policies import FluxPolicy, PolicyConfig
from policies.adapters import MoELoRALinear
from rl_align.core.config import load_config
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.sft.config import SFTConfig
from rl_align.sft.stages import stage_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# MultiCrafter (multicrafter.txt Sec. 5.1 "Implementation Details" and Appendix B).
MULTICRAFTER_POLICY = {
    "position_scheme": "uno", "dtype": "bfloat16",  # not a paper number: FLUX.1-dev's own precision
    "lora.enabled": True, "lora.rank": 512,  # "each LoRA module's rank to r=512"
    "moe_lora.enabled": True, "moe_lora.num_experts": 4, "moe_lora.top_k": 1, "moe_lora.rank": 512,  # "4 experts and activate 1"
}
MULTICRAFTER_DATA = {"data.target_size": 512, "data.reference_size": 320}  # "512x512", "320x320"
MULTICRAFTER_SINGLE = {  # "Single-Subject Pre-training": 40,000 steps, L_diff only, AdamW 3e-5, wd 1e-2, batch 6 per card
    "stage": "single", "steps": 40000, "optim.learning_rate": 3e-5, "optim.weight_decay": 1e-2, "data.batch_size": 6,
}
MULTICRAFTER_IDAR_HUMAN = {  # "decrease the learning rate to 1e-5, lambda = 0.3 ... 25,000 steps ... batch size to 4"
    "stage": "idar", "steps": 25000, "optim.learning_rate": 1e-5, "optim.weight_decay": 1e-2, "idar.attention_weight": 0.3,
    "data.batch_size": 4, "data.crop_reference_categories": ("face",),  # Sec. 4.2: the face crop is a human's reference
}
MULTICRAFTER_IDAR_OBJECT = MULTICRAFTER_IDAR_HUMAN | {"steps": 15000}  # "we only train for 15,000 steps"
MULTICRAFTER_IPPO = {  # "sampling step of 16, window size w=2, shift interval tau=50, window stride s=1 ... 300 steps"
    "iterations": 300, "sampler.num_steps": 16, "sampler.window_size": 2, "sampler.window_shift_interval": 50,
    "sampler.window_stride": 1, "learner.algorithm": "gspo", "rollout.image_size": 512, "rollout.reference_size": 320,
    "rollout.groups_per_iteration": 16, "workers.learners": 16,  # "16 cards ... batch size of each card to 1"
}
MULTICRAFTER_WEIGHTS = {  # Appendix B: reward weights
    "multi_human": {"id": 0.5, "text": 1.4, "aesthetic": 0.7},
    "multi_object": {"id": 1.0, "text": 1.4, "aesthetic": 0.7},
}
# MUSAR (musar.txt Sec. 3.2, 4.1): dual-branch LoRA only, 128 subject / 4 noisy-image ranks, no LoRA on the
# prompt, static routing in training, the 20k / 10k (80% diptych, 20% single) / 10k same-category curriculum.
MUSAR = {
    "stage": "diptych", "steps": 40000, "diptych.single_steps": 20000, "diptych.mixed_steps": 10000,
    "diptych.mixed_single_fraction": 0.2, "policy.dual_branch.enabled": True, "policy.dual_branch.condition_rank": 128,
    "policy.dual_branch.noisy_rank": 4, "policy.lora.enabled": False, "policy.moe_lora.enabled": False,
    "policy.attention.static_routing": True, "policy.condition_prompts.enabled": True,  # [CI^1; CT^1; ...; T; X]
}
# One-for-All (one_for_all.txt Sec. 4.1): FLUX.1-Kontext-dev, "LoRA module of rank 512", lr 5e-6, total batch
# 16 on 16 GPUs, 30,000 iterations, 1024x768 synthesis and 768x576 references, 25 sampling steps; Sec. 3:
# condition ids face 1 ... bag 4, Dynamic Attention Modulation with t_min 0.01.
ONE_FOR_ALL = {
    "stage": "position_id", "steps": 30000, "optim.learning_rate": 5e-6, "data.batch_size": 1, "data.target_size": 768,
    "data.reference_size": 576, "output.sample_steps": 25, "policy.lora.enabled": True, "policy.lora.rank": 512,
    "policy.moe_lora.enabled": False, "policy.position_scheme": "condition_id",
    "policy.condition_categories": ("face", "upper garment", "lower garment", "bag"), "policy.attention.temperature": True,
    "policy.attention.temperature_min": 0.01,
}
# MS-CustomNet (ms_customnet.txt Sec. IV-A): K 2 -> 5 with gamma 1, 7 epochs at 1e-4 then 3 at 5e-5, effective batch 4.
MS_CUSTOMNET = {
    "curriculum.enabled": True, "curriculum.min_subjects": 2, "curriculum.max_subjects": 5, "curriculum.gamma": 1.0,
    "optim.learning_rate": 1e-4, "optim.second_learning_rate": 5e-5, "optim.first_stage_fraction": 0.7, "data.batch_size": 4,
}
# AnyStory (anystory.txt Sec. 3.4, 4.1): routing loss weight lambda 0.1, AdamW lr 1e-4, batch 64 on 8 GPUs.
ANYSTORY = {"stage": "routing", "routing.routing_weight": 0.1, "optim.learning_rate": 1e-4, "data.batch_size": 8}


def value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def assert_table(cfg, table: dict, where: str) -> None:
    wrong = {key: (value(cfg, key), expected) for key, expected in table.items() if value(cfg, key) != expected}
    assert not wrong, f"{where} differs from its paper (key: (preset, paper)): {wrong}"


def trained(name: str) -> SFTConfig:
    """An SFT preset with the policy its stage trains (what the run's policy.yaml will say)."""
    cfg = load_config(SFTConfig, CONFIGS / "sft" / name)
    return dataclasses.replace(cfg, policy=stage_policy(cfg.policy, cfg.stage))


@pytest.mark.parametrize(
    ("name", "table"),
    [("multicrafter_single.yaml", MULTICRAFTER_SINGLE), ("multicrafter_idar_human.yaml", MULTICRAFTER_IDAR_HUMAN),
     ("multicrafter_idar_object.yaml", MULTICRAFTER_IDAR_OBJECT)],
)
def test_multicrafter_warm_start_presets(name, table):
    cfg = trained(name)
    assert_table(cfg, table | MULTICRAFTER_DATA, name)
    assert_table(cfg.policy, MULTICRAFTER_POLICY, f"{name} policy")


@pytest.mark.parametrize("task", ["multi_human", "multi_object"])
def test_multicrafter_ippo_presets(task):
    cfg = load_config(GSPOTrainConfig, CONFIGS / f"ippo_{task}.yaml")
    assert_table(cfg, MULTICRAFTER_IPPO, f"ippo_{task}.yaml")
    assert_table(cfg.policy, MULTICRAFTER_POLICY, f"ippo_{task}.yaml policy")
    assert cfg.reward.resolved_weights() == MULTICRAFTER_WEIGHTS[task]


def test_multicrafter_plain_lora_adapts_every_other_block_layer():
    """MultiCrafter: MoE-LoRA on the FFN output layers "while other layers are adapted using standard
    LoRA". On a tiny FLUX with the preset's adapter layout, every linear layer of every block carries
    exactly one adapter (plain LoRA or MoE-LoRA), except the AdaLN modulation layers (norm*.linear), which
    read the timestep embedding, not tokens."""
    preset = load_config(PolicyConfig, CONFIGS / "policy" / "multicrafter_flux_dev.yaml")
    small = dataclasses.replace(
        PolicyConfig(), lora=dataclasses.replace(preset.lora, rank=2, alpha=2.0), moe_lora=dataclasses.replace(preset.moe_lora, rank=2, alpha=2.0),
    )
    bare = FluxPolicy.from_config(dataclasses.replace(small, lora=dataclasses.replace(small.lora, enabled=False), moe_lora=dataclasses.replace(small.moe_lora, enabled=False)))
    layers = {name for name, m in bare.transformer.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in name}
    modulation = {name for name in layers if name.rsplit(".", 2)[-2].startswith("norm")}
    adapted = FluxPolicy.from_config(small).transformer.named_modules()
    adapters = [(name, m) for name, m in adapted if isinstance(m, (MoELoRALinear, LoraLayer))]
    moe = {name for name, m in adapters if isinstance(m, MoELoRALinear)}
    lora = {name for name, m in adapters if isinstance(m, LoraLayer)}
    assert moe and lora and not moe & lora
    assert layers - modulation == moe | lora
    assert {name.split(".", 2)[2] for name in lora if name.startswith("single_transformer_blocks.")} == {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}


def test_musar_preset():
    cfg = trained("musar_diptych.yaml")
    assert_table(cfg, MUSAR, "musar_diptych.yaml")


def test_one_for_all_preset():
    cfg = trained("one_for_all_position_id.yaml")
    assert_table(cfg, ONE_FOR_ALL, "one_for_all_position_id.yaml")
    assert cfg.policy.path.endswith("FLUX.1-Kontext-dev")


def test_ms_customnet_preset():
    assert_table(trained("ms_customnet_coco.yaml"), MS_CUSTOMNET, "ms_customnet_coco.yaml")


def test_anystory_preset():
    assert_table(trained("anystory_routing.yaml"), ANYSTORY, "anystory_routing.yaml")


def test_ippo_presets_name_mixgrpo_static_shift_option():
    """MixGRPO (which MultiCrafter follows for IPPO) samples with a static shift of 3; the presets keep
    FLUX's dynamic shift and carry MixGRPO's s for the one-key switch time_shift=static."""
    for task in ("multi_human", "multi_object"):
        cfg = load_config(GSPOTrainConfig, CONFIGS / f"ippo_{task}.yaml", ["sampler.time_shift=static"])
        assert (cfg.sampler.time_shift, cfg.sampler.static_shift) == ("static", 3.0)
        assert "MixGRPO" in (CONFIGS / f"ippo_{task}.yaml").read_text()


def test_musar_policy_at_tiny_size_trains_a_diptych_step_and_conditions_rl_tasks(tmp_path):
    """The MUSAR preset's adapters and conditioning on a tiny FLUX: a diptych step trains the dual-branch
    LoRA with each condition's caption tokens in the text stream, and RL's task conditioning (also used by
    evaluation and generation) carries the tasks' captions, with static and dynamic routing."""
    from rl_align.ippo.rollout import condition_task
    from rl_align.ippo.tasks import SyntheticShapeTasks, TaskConfig
    from rl_align.sft.builders import build_synthetic_manifest
    from rl_align.sft.data import BatchStream, SFTDataConfig
    from rl_align.sft.manifest import load_manifest
    from rl_align.sft.objective import StageObjective, train_step
    from rl_align.core.optim import make_optimizer

    preset = load_config(PolicyConfig, CONFIGS / "policy" / "musar_flux_dev.yaml")
    small = dataclasses.replace(
        preset, source="tiny", path=None, dual_branch=dataclasses.replace(preset.dual_branch, condition_rank=4, noisy_rank=2),
        condition_prompts=dataclasses.replace(preset.condition_prompts, tokens=4),
    )
    data = SFTDataConfig(target_size=32, reference_size=16, size_multiple=16, batch_size=2)
    cfg = SFTConfig(stage="diptych", data=data, policy=stage_policy(small, "diptych"))
    policy = FluxPolicy.from_config(cfg.policy)
    manifest = build_synthetic_manifest(tmp_path, samples=4, min_subjects=2, max_subjects=2, image_size=32, reference_size=16, seed=0)
    stream = BatchStream(load_manifest(manifest), manifest.parent, data, seed=0)
    batch = stream.next()
    objective = StageObjective(policy, cfg)
    assert objective.conditioning(batch).layout.captions == (4, 4)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    stats = train_step(objective, make_optimizer(policy.trainable_parameters(), cfg.optim), batch, key=0, learning_rate=1e-3)
    assert not stats.skipped and torch.isfinite(stats.terms.total)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))

    task = SyntheticShapeTasks(TaskConfig(min_subjects=2, max_subjects=2, reference_size=16), seed=0).task(0, 0)
    conditioning = condition_task(policy, task, 32, 32, 16)
    assert conditioning.layout.captions == (4, 4)
    x = torch.randn(1, *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    routed = FluxPolicy.from_config(dataclasses.replace(policy.cfg, attention=dataclasses.replace(policy.cfg.attention, dynamic_routing=True)))
    routed.load_adapter_state(policy.adapter_state())  # the inference-time mode of the same weights
    with torch.no_grad():
        static = policy.velocity_fn(conditioning)(x, torch.tensor([0.7]))
        dynamic = routed.velocity_fn(condition_task(routed, task, 32, 32, 16))(x, torch.tensor([0.7]))
    assert torch.isfinite(static).all() and torch.isfinite(dynamic).all() and not torch.allclose(static, dynamic)
