"""Generation with reference subjects (rl_align/eval/generation.py, scripts/generate.py): policy specs,
determinism and seeds, dynamic routing, and the attention mode a policy carries from warm-start training
into RL rollouts, evaluation and generation."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from policies import AttentionConfig, AttentionSwitches, ConditionPromptConfig, FluxPolicy, PolicyConfig
from policies.components import build_tiny_components, save_components
from policies.policy import with_adapters_of
from rl_align.core.checkpoints import Checkpoint, save_checkpoint
from rl_align.core.config import load_config, save_config
from rl_align.core.errors import SetupError
from rl_align.core.synthetic import ShapeSubject, render_reference
from rl_align.eval.generation import GenerationConfig, PolicySource, generate, initial_noise, load_policy, resolve_policy
from rl_align.ippo.rollout import RolloutConfig, rollout_chunk, task_conditioning
from rl_align.ippo.tasks import Task
from rewards.types import ReferenceSubject
from rl_align.core.images import images_to_uint8
from samplers import GroupKey, SamplerConfig, mixed_rollout
from samplers.rollout import ode_solve
from policy_helpers import randomize_adapters

ROOT = Path(__file__).resolve().parents[1]
SMALL = GenerationConfig(num_images=2, steps=3, height=32, width=32, reference_size=16, batch_size=2)
SUBJECTS = (ShapeSubject("circle", "red"), ShapeSubject("square", "blue"))
TASK = Task(
    "a red circle and a blue square on a white background",
    tuple(ReferenceSubject(render_reference(s, 32), "object", s.caption) for s in SUBJECTS),
    ("circle", "square"),
)


def _policy(**attention) -> FluxPolicy:
    policy = FluxPolicy.from_config(PolicyConfig(attention=AttentionConfig(**attention)))
    randomize_adapters(policy, seed=3)
    return policy.eval()


def test_generation_is_deterministic_keyed_by_seed_and_runs_the_policy():
    policy = _policy()
    first, again = generate(policy, TASK, SMALL), generate(policy, TASK, SMALL)
    assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first[0], first[1])  # image k has its own noise
    shifted = generate(policy, TASK, dataclasses.replace(SMALL, seed=1, num_images=1))
    assert np.abs(shifted[0].astype(int) - first[1].astype(int)).max() <= 1  # image 1 of seed 0 is seed 1's image 0
    # the images are the ODE solution from the keyed noise with the policy's velocity, nothing else
    conditioning = task_conditioning(policy, TASK, RolloutConfig(image_size=32, reference_size=16))
    noise = initial_noise([0, 1], policy.latent_shape(32, 32))
    latents = ode_solve(policy.velocity_fn(conditioning), noise, SMALL.sigmas(conditioning.layout.noisy))
    assert np.array_equal(first, images_to_uint8(policy.decode_latents(latents)))


def test_dynamic_routing_changes_the_images_and_needs_captions_in_the_prompt():
    plain, routed = _policy(), _policy(dynamic_routing=True)
    assert routed.needs_item_phrases and not plain.needs_item_phrases
    assert not np.array_equal(generate(plain, TASK, SMALL), generate(routed, TASK, SMALL))
    bad = dataclasses.replace(TASK, prompt="two shapes on a white background")
    with pytest.raises(SetupError, match="item phrase 'a red circle' does not occur"):
        generate(routed, bad, SMALL)


ROLLOUT = RolloutConfig(image_size=32, reference_size=16, group_size=2, chunk_size=2)
SAMPLER = SamplerConfig(num_steps=3, window_size=2)


def _rollout_images(policy: FluxPolicy) -> np.ndarray:
    return rollout_chunk(policy, TASK, GroupKey(0, 0, 0), [0, 1], [0, 1], SAMPLER, ROLLOUT).images


def test_a_static_routing_policy_runs_with_it_in_rl_and_generation():
    """The diptych stage's policy (static routing in its attention mode): RL rollouts and generation use
    the routing, and give what an explicit static-routing call gives."""
    routed, plain = _policy(static_routing=True), _policy()
    assert routed.attention_mode == AttentionSwitches(static_routing=True)
    assert not np.array_equal(_rollout_images(routed), _rollout_images(plain))
    # the same rollout by hand, the routing switched on explicitly in the weights-identical plain policy
    velocity = plain.velocity_fn(task_conditioning(plain, TASK, ROLLOUT), AttentionSwitches(static_routing=True))
    by_hand = mixed_rollout(velocity, GroupKey(0, 0, 0), plain.latent_shape(32, 32), SAMPLER.sigmas(64), [0, 1], SAMPLER.eta, samples=[0, 1])
    assert np.array_equal(_rollout_images(routed), images_to_uint8(plain.decode_latents(by_hand.latents)))
    assert not np.array_equal(generate(routed, TASK, SMALL), generate(plain, TASK, SMALL))


def test_adapters_record_the_attention_mode_they_were_trained_with(tmp_path):
    routed = _policy(static_routing=True)
    routed.save_adapters(tmp_path / "adapters")
    with pytest.raises(ValueError, match="'static_routing' is True but this policy has False"):
        _policy().load_adapters(tmp_path / "adapters")
    rebuilt = with_adapters_of(PolicyConfig(lora=dataclasses.replace(PolicyConfig().lora, enabled=False)), tmp_path / "adapters")
    assert rebuilt.attention.static_routing and rebuilt.lora == routed.cfg.lora and rebuilt.moe_lora == routed.cfg.moe_lora
    assert not rebuilt.condition_prompts.enabled
    # MUSAR's per-condition prompts are part of what the adapters were trained with, too
    captioned = FluxPolicy.from_config(PolicyConfig(condition_prompts=ConditionPromptConfig(enabled=True, tokens=5)))
    captioned.save_adapters(tmp_path / "captioned")
    with pytest.raises(ValueError, match="'condition_prompts' is"):
        _policy().load_adapters(tmp_path / "captioned")
    assert with_adapters_of(PolicyConfig(), tmp_path / "captioned").condition_prompts == ConditionPromptConfig(enabled=True, tokens=5)


def test_policy_specs_resolve_run_folders_yaml_files_and_diffusers_folders(tmp_path):
    trained = _policy(static_routing=True)
    run = tmp_path / "run"
    trained.save_adapters(run / "adapters")
    save_config(trained.cfg, run / "policy.yaml")
    source = resolve_policy(str(run))
    assert source.adapters == run / "adapters" and source.config.attention.static_routing
    assert np.array_equal(generate(load_policy(source), TASK, SMALL), generate(trained, TASK, SMALL))

    preset = resolve_policy(str(ROOT / "configs" / "policy" / "tiny.yaml"), ["attention.dynamic_routing=true"])
    assert preset.adapters is None and preset.config.attention.dynamic_routing

    base = tmp_path / "flux"
    save_components(build_tiny_components(PolicyConfig().tiny), base)
    bare = resolve_policy(str(base))
    assert bare.config.source == "local" and not bare.config.lora.enabled and not bare.config.moe_lora.enabled
    with_adapters = resolve_policy(f"{base}@{run / 'adapters'}")
    assert with_adapters.config.attention.static_routing and with_adapters.config.moe_lora.enabled
    load_policy(with_adapters)  # the adapters fit the base they were trained on

    for spec, message in [
        (str(tmp_path / "missing"), "is not a run folder"),
        (f"{run}@{tmp_path / 'nope'}", "nope is neither an adapter folder nor a checkpoint file"),
    ]:
        with pytest.raises(SetupError, match=message):
            resolve_policy(spec)
    (tmp_path / "unfinished").mkdir()
    save_config(trained.cfg, tmp_path / "unfinished" / "policy.yaml")
    with pytest.raises(SetupError, match="has no adapters/"):
        resolve_policy(str(tmp_path / "unfinished"))
    wrong = PolicySource("x", PolicyConfig(), run / "adapters")  # adapters of another attention mode
    with pytest.raises(SetupError, match="policy 'x'.*static_routing"):
        load_policy(wrong)


def test_a_run_checkpoint_names_the_adapters_of_that_iteration(tmp_path):
    trained = _policy(static_routing=True)
    run = tmp_path / "run"
    trained.save_adapters(run / "adapters")
    save_config(trained.cfg, run / "policy.yaml")
    earlier = _policy(static_routing=True)
    randomize_adapters(earlier, seed=4)  # the policy as it was at that checkpoint, not the final one
    checkpoint = save_checkpoint(run, Checkpoint(completed=60, adapters=earlier.adapter_state(), optimizer={}))
    source = resolve_policy(f"{run}@{checkpoint}")
    assert source.adapters == checkpoint and source.config.attention.static_routing
    images = generate(load_policy(source), TASK, SMALL)
    assert np.array_equal(images, generate(earlier, TASK, SMALL)) and not np.array_equal(images, generate(trained, TASK, SMALL))

    base = tmp_path / "flux"
    save_components(build_tiny_components(PolicyConfig().tiny), base)
    with pytest.raises(SetupError, match="does not record its adapter layout.*RUN@"):
        resolve_policy(f"{base}@{checkpoint}")
    with pytest.raises(SetupError, match="neither an adapter folder nor a checkpoint file"):
        resolve_policy(f"{run}@{run / 'policy.yaml'}")
    checkpoint.write_bytes(checkpoint.read_bytes()[:-8])  # truncated: its checksum no longer matches
    with pytest.raises(SetupError, match=f"policy '{run}@{checkpoint}'.*damaged"):
        load_policy(resolve_policy(f"{run}@{checkpoint}"))


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("**/*.png"))}


@pytest.mark.slow  # three script runs (about 10 s each)
def test_generate_script_writes_byte_identical_pngs_for_the_same_arguments(tmp_path):
    from PIL import Image

    references = []
    for subject in SUBJECTS:
        path = tmp_path / f"{subject.colour}.png"
        Image.fromarray(render_reference(subject, 32)).save(path)
        references += ["--reference", str(path), "--caption", subject.caption]
    common = ["--policy", str(ROOT / "configs" / "policy" / "tiny.yaml"), "--prompt", TASK.prompt, *references,
              "--num-images", "2", "--steps", "3", "--height", "32", "--width", "32", "--reference-size", "16"]
    runs = {}
    for name, extra in [("a", []), ("b", []), ("seed", ["--seed", "5"])]:
        result = _generate(*common, "--out", str(tmp_path / name), *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = _digests(tmp_path / name)
    assert list(runs["a"]) == ["image-00.png", "image-01.png"]
    assert runs["a"] == runs["b"]
    assert set(runs["seed"].values()).isdisjoint(runs["a"].values())
    settings = yaml.safe_load((tmp_path / "a" / "generation.json").read_text())
    assert settings["num_images"] == 2 and settings["attention"]["dynamic_routing"] is False

    manifest = tmp_path / "tasks.jsonl"
    manifest.write_text("\n".join(
        '{"prompt": "%s", "references": [{"image": "%s.png", "kind": "object", "caption": "%s"}]}' % (s.caption + " on white", s.colour, s.caption)
        for s in SUBJECTS
    ) + "\n")
    batch = _generate(*common[:2], "--tasks", str(manifest), "--out", str(tmp_path / "batch"), "--num-images", "1", "--steps", "2",
                      "--height", "32", "--width", "32", "--dynamic-routing")
    assert batch.returncode == 0, batch.stderr[-2000:]
    assert list(_digests(tmp_path / "batch")) == ["task-0000/image-00.png", "task-0001/image-00.png"]

    again = _generate(*common, "--out", str(tmp_path / "a"))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "already holds images" in again.stderr
    mismatch = _generate(*common[:4], "--reference", str(tmp_path / "red.png"), "--caption", "a", "--caption", "b", "--out", str(tmp_path / "m"))
    assert mismatch.returncode == 2 and "--caption: given 2 times for 1 --reference" in mismatch.stderr


def test_policy_yaml_of_a_diptych_run_carries_static_routing():
    """What stage diptych trains is what RL loads: policy.yaml has static routing on."""
    from rl_align.sft.stages import stage_policy

    trained = stage_policy(load_config(PolicyConfig, ROOT / "configs" / "policy" / "tiny.yaml"), "diptych")
    assert trained.attention.static_routing and trained.dual_branch.enabled and not trained.lora.enabled
    assert not stage_policy(PolicyConfig(), "idar").attention.static_routing
