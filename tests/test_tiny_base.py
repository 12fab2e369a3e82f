"""The embedded default's tiny base (rl_align/core/tiny_base.py): flow matching on the synthetic scenes
lowers its loss, the folder round-trips through the local loader (the FLUX.1-dev path), the build is
deterministic, atomic and only runs when asked for."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policies import FluxPolicy, PolicyConfig, TinyFluxConfig
from rl_align.core.config import load_config
from rl_align.core.tiny_base import TinyBaseConfig, base_policy_config, build_tiny_base, ensure_base, scene_batch, train_base
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.sft.config import SFTConfig
from rl_align.sft.stages import stage_policy

ROOT = Path(__file__).resolve().parents[1]
SMALL = TinyBaseConfig(model=TinyFluxConfig(), steps=3, batch_size=4, sample_steps=2)


def test_scene_batches_hold_the_named_subjects():
    batch = scene_batch(np.random.default_rng(0), 2, 3, SMALL)
    assert len(batch.prompts) == 3 and len(batch.references) == 2 and batch.targets.shape == (3, 3, 32, 32)
    assert all(r.shape == (3, 3, 16, 16) for r in batch.references)
    for b, prompt in enumerate(batch.prompts):
        for slot in range(2):
            reference = batch.references[slot][b]  # (3, 16, 16): the subject's colour at its centre
            colour = (reference[:, 8, 8] * 255).round().to(torch.uint8)
            in_scene = (batch.targets[b] * 255).round().to(torch.uint8).flatten(1).T  # (H W, 3)
            assert (in_scene == colour).all(dim=1).any(), f"reference {slot} colour missing from scene {b}: {prompt}"


def test_flow_matching_lowers_the_loss_of_every_transformer_weight():
    policy, losses = train_base(dataclasses.replace(SMALL, steps=30, learning_rate=3e-3))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert not any(p.requires_grad for p in policy.parameters())  # frozen again once trained
    fresh = dict(FluxPolicy.from_config(base_policy_config(SMALL)).transformer.named_parameters())
    changed = [name for name, p in policy.transformer.named_parameters() if not torch.equal(p, fresh[name])]
    assert len(changed) == len(list(policy.transformer.parameters()))  # a full fine-tune, not adapters


def test_the_base_folder_round_trips_through_the_local_loader(tmp_path):
    folder = build_tiny_base(SMALL, tmp_path / "base")
    assert not (tmp_path / "base.partial").exists()
    report = json.loads((folder / "base.json").read_text())
    assert report["config"]["steps"] == 3 and len(report["loss"]) == 3 and (folder / "samples.png").is_file()
    trained, _ = train_base(SMALL)  # deterministic: the same weights again
    loaded = FluxPolicy.from_config(dataclasses.replace(base_policy_config(SMALL), source="local", path=str(folder)))
    prompts = loaded.encode_prompts(["a red circle on a white background"])
    references = [torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))]
    x = torch.randn(2, *loaded.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        expected = trained(x, sigma, trained.condition(trained.encode_prompts(["a red circle on a white background"]), references, 32, 32)).velocity
        got = loaded(x, sigma, loaded.condition(prompts, references, 32, 32)).velocity
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    with pytest.raises(FileExistsError):
        build_tiny_base(SMALL, folder)


def test_the_base_is_built_only_when_asked_and_missing(tmp_path):
    policy = PolicyConfig(source="local", path=str(tmp_path / "base"))
    ensure_base(policy, SMALL)  # build_if_missing is off
    assert not (tmp_path / "base").exists()
    ensure_base(policy, dataclasses.replace(SMALL, build_if_missing=True))
    built = (tmp_path / "base" / "base.json").stat().st_mtime_ns
    ensure_base(policy, dataclasses.replace(SMALL, build_if_missing=True))  # present: left as it is
    assert (tmp_path / "base" / "base.json").stat().st_mtime_ns == built


def test_the_quickstart_trains_on_the_base_with_the_multi_subject_reward():
    cfg = load_config(GSPOTrainConfig, ROOT / "configs" / "quickstart.yaml")
    assert cfg.policy.source == "local" and cfg.policy.path == ".cache/tiny-base" and cfg.base.build_if_missing
    assert cfg.base.image_size == cfg.rollout.image_size and cfg.base.reference_size == cfg.rollout.reference_size
    assert cfg.reward.resolved_weights() == {"id": 1.0, "subject_count": 0.2, "background": 0.2}
    assert cfg.reward.object.backend == "shapes" and cfg.reward.id_kinds == ("object",)


def test_the_quickstart_warm_start_trains_the_quickstart_policy_on_the_base_scenes():
    ippo = load_config(GSPOTrainConfig, ROOT / "configs" / "quickstart.yaml")
    sft = load_config(SFTConfig, ROOT / "configs" / "sft" / "quickstart_idar.yaml")
    assert sft.stage == "idar" and sft.idar.attention_weight == 0.3  # MultiCrafter Appendix B
    # The run's policy.yaml is what train_gspo.py then loads: the same base and adapters as the quickstart.
    assert stage_policy(sft.policy, sft.stage) == ippo.policy
    assert sft.data.target_size == sft.data.synthetic.image_size == ippo.base.image_size
    assert sft.data.reference_size == sft.data.synthetic.reference_size == ippo.base.reference_size
    assert sft.optim.learning_rate == ippo.learner.learning_rate
