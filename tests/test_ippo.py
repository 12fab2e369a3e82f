"""IPPO with the real tiny FLUX policy, in one process: on-policy log-probs, what an update changes,
adapter transport between policy copies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from policies import FluxPolicy, MoELoRAConfig, PolicyConfig
from rl_align.core.config import load_config
from rl_align.core.optim import make_optimizer
from rl_align.ippo.config import GSPOTrainConfig
from rl_align.ippo.learner import GroupTransitions, LearnerConfig, policy_update
from rl_align.ippo.rollout import ReferenceVelocity, RolloutConfig, rollout_chunk, task_conditioning
from rl_align.ippo.trainer import iteration_metrics, run_iteration
from rl_align.ippo.workers import LocalWorkers
from rl_align.ippo.tasks import SyntheticShapeTasks, TaskConfig, build_task_source
from samplers import GroupKey, SamplerConfig

SAMPLER = SamplerConfig(num_steps=6, window_size=2)
ROLLOUT = RolloutConfig(image_size=32, reference_size=16, group_size=4, chunk_size=2)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return FluxPolicy.from_config(PolicyConfig())


@pytest.fixture(scope="module")
def task():
    return SyntheticShapeTasks(TaskConfig(min_subjects=2, max_subjects=2, reference_size=16), seed=0).task(0, 0)


def test_rollout_gives_images_and_window_transitions(policy, task):
    out = rollout_chunk(policy, task, GroupKey(0, 0, 0), (0, 1), [1, 2], SAMPLER, ROLLOUT)
    assert out.images.shape == (2, 32, 32, 3) and out.images.dtype == np.uint8
    assert [t.step for t in out.learner_input.transitions] == [1, 2] and out.learner_input.transitions[0].x_t.shape[0] == 2
    assert not np.array_equal(out.images[0], out.images[1])  # the SDE window makes group members differ


def test_learner_log_probs_equal_the_rollout_before_the_first_update(policy, task):
    chunk = rollout_chunk(policy, task, GroupKey(0, 0, 0), (0, 1), [0, 1], SAMPLER, ROLLOUT)
    velocity = policy.velocity_fn(task_conditioning(policy, task, ROLLOUT))
    optimizer = make_optimizer(policy.trainable_parameters(), LearnerConfig())
    stats = policy_update([GroupTransitions(0, chunk.learner_input.transitions, torch.tensor([1.0, -1.0]))], lambda g: velocity, optimizer, LearnerConfig())
    assert stats.ratio_mean == pytest.approx(1.0, abs=1e-6)
    assert stats.clip_fraction == 0.0


def test_update_changes_only_adapters_and_transports(task):
    torch.manual_seed(0)
    learner_policy, worker_policy = FluxPolicy.from_config(PolicyConfig()), FluxPolicy.from_config(PolicyConfig())
    frozen_before = {n: p.detach().clone() for n, p in learner_policy.named_parameters() if not p.requires_grad}
    adapters_before = learner_policy.adapter_state()
    chunk = rollout_chunk(worker_policy, task, GroupKey(0, 0, 0), (0, 1, 2, 3), [0, 1], SAMPLER, ROLLOUT)
    velocity = learner_policy.velocity_fn(task_conditioning(learner_policy, task, ROLLOUT))
    cfg = LearnerConfig(learning_rate=1e-2)
    stats = policy_update([GroupTransitions(0, chunk.learner_input.transitions, torch.tensor([1.5, -0.5, 0.5, -1.5]))], lambda g: velocity, make_optimizer(learner_policy.trainable_parameters(), cfg), cfg)
    assert not stats.skipped
    for name, p in learner_policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), name
    after = learner_policy.adapter_state()
    assert any(not torch.equal(after[k], adapters_before[k]) for k in after)

    worker_policy.load_adapter_state(after)  # what rollout workers receive after each update
    conditioning = task_conditioning(worker_policy, task, ROLLOUT)
    x = torch.randn(2, *worker_policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(worker_policy.velocity_fn(conditioning)(x, sigma), velocity(x, sigma), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        worker_policy.load_adapter_state({"nope": torch.zeros(1)})


def test_kl_to_the_adapters_off_reference(task):
    """Fresh LoRA and MoE-LoRA adapters are the identity (B = 0): the policy equals its adapters-off
    reference, so the first KL is 0; after updates it is not."""
    torch.manual_seed(0)
    policy = FluxPolicy.from_config(PolicyConfig())
    chunk = rollout_chunk(policy, task, GroupKey(0, 0, 0), (0, 1, 2, 3), [0, 1], SAMPLER, ROLLOUT)
    conditioning = task_conditioning(policy, task, ROLLOUT)
    x = torch.randn(2, *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(2))
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        with_adapters = policy.velocity_fn(conditioning)(x, sigma)
        without = ReferenceVelocity(policy, conditioning)(x, sigma)
        again = policy.velocity_fn(conditioning)(x, sigma)
    assert torch.equal(with_adapters, again)  # the context restores the adapters
    assert torch.equal(with_adapters, without)
    items = [GroupTransitions(0, chunk.learner_input.transitions, torch.tensor([1.5, -0.5, 0.5, -1.5]))]
    cfg = LearnerConfig(learning_rate=3e-2, kl_beta=1.0)
    optimizer = make_optimizer(policy.trainable_parameters(), cfg)
    kls = [
        policy_update(items, lambda g: policy.velocity_fn(conditioning), optimizer, cfg, reference_of=lambda g: ReferenceVelocity(policy, conditioning)).kl
        for _ in range(3)
    ]
    assert kls[0] == 0.0 and kls[-1] > 0.0  # the adapters moved away from the reference


def test_frozen_gates_travel_with_the_adapters():
    """With freeze_gate the MoE gate is not trained, but warm-start adapters may bring other gate weights
    than a fresh policy's: the transported state must carry them."""
    cfg = PolicyConfig(moe_lora=MoELoRAConfig(freeze_gate=True))
    learner, worker = FluxPolicy.from_config(cfg), FluxPolicy.from_config(cfg)
    with torch.no_grad():
        for name, p in learner.named_parameters():
            if "gate" in name or "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    state = learner.adapter_state()
    assert any("gate" in name for name in state)
    worker.load_adapter_state(state)
    x = torch.randn(1, *worker.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.6])
    tasks = SyntheticShapeTasks(TaskConfig(reference_size=16), seed=0).task(0, 0)
    with torch.no_grad():
        expected = learner.velocity_fn(task_conditioning(learner, tasks, ROLLOUT))(x, sigma)
        got = worker.velocity_fn(task_conditioning(worker, tasks, ROLLOUT))(x, sigma)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_condition_ids_come_from_categories_as_in_warm_start(task):
    """Under condition_id, RL places each reference by its category (policy.condition_categories), the
    mapping the position_id warm-start stage trained with; a task without categories numbers them."""
    policy = FluxPolicy.from_config(PolicyConfig(position_scheme="condition_id", condition_categories=("circle", "square", "triangle", "diamond")))
    categorized = task_conditioning(policy, task, ROLLOUT)
    expected = policy.condition(
        policy.encode_prompts([task.prompt], item_phrases=[r.caption for r in task.references]),
        [torch.zeros(1, 3, 16, 16)] * 2, 32, 32, policy.condition_ids(task.categories),
    )
    assert torch.equal(categorized.img_ids, expected.img_ids) and torch.equal(categorized.txt_ids, expected.txt_ids)
    assert policy.condition_ids(task.categories) == (4, 1)  # a diamond and a circle
    numbered = task_conditioning(policy, dataclasses.replace(task, categories=None), ROLLOUT)  # ids 1, 2
    assert not torch.equal(numbered.img_ids, categorized.img_ids)
    with pytest.raises(ValueError, match="have no condition id"):
        task_conditioning(policy, dataclasses.replace(task, categories=("hexagon", "circle")), ROLLOUT)


def test_trainer_phases_in_process():
    """One run_iteration of the trainer on LocalWorkers: rewards in chunk order with their groups, the
    on-policy first step, a driver that fetched only scores and statistics, and the next iteration's
    rollouts on the updated adapters."""
    cfg = load_config(GSPOTrainConfig, None, [
        "sampler.num_steps=6", "rollout.image_size=32", "rollout.reference_size=16", "rollout.group_size=4", "rollout.chunk_size=2",
        "tasks.reference_size=16", "learner.learning_rate=1e-2",
    ])
    torch.manual_seed(0)
    workers = LocalWorkers(cfg)
    tasks = build_task_source(cfg.tasks, cfg.run.seed)
    first = run_iteration(workers, cfg, tasks, 0, 0, workers.adapters())
    assert [(c.group, c.sample_ids) for c in first.launch.chunks] == [(0, (0, 1)), (0, (2, 3)), (1, (0, 1)), (1, (2, 3))]
    assert first.rewards.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for g, task in enumerate(first.launch.tasks):  # each group's images scored against its own task
        images = np.concatenate([c.images for c in first.launch.chunks if c.group == g])
        expected = workers.reward_runner.score(images, task).rewards
        np.testing.assert_allclose(first.rewards.rewards[4 * g : 4 * g + 4].numpy(), expected, rtol=1e-6)
    assert first.steps[0].ratio_mean == pytest.approx(1.0, abs=1e-6) and not first.steps[0].skipped
    assert 0 < workers.fetched_bytes < 2048  # 8 rewards and components, one UpdateStats

    second = run_iteration(workers, cfg, tasks, 1, 1, first.adapters)
    assert workers.rollout_runner.version == 1
    learner_state, rollout_state = workers.learner.policy.adapter_state(), workers.rollout_runner.policy.adapter_state()
    assert any(not torch.equal(learner_state[k], rollout_state[k]) for k in learner_state)  # the learner stepped again
    for name, value in first.adapters.items():
        assert torch.equal(rollout_state[name], value), name  # iteration 1 rolled out with iteration 0's update
    assert second.steps[0].ratio_mean == pytest.approx(1.0, abs=1e-6)


def test_minibatched_iteration_steps_off_policy_and_observes_expert_flips():
    """M = 2 with a large learning rate: the first step is on-policy (ratios exactly 1, no clipping, no
    expert flips); the second recomputes under the updated policy, so its ratios leave the clip band and
    the MoE gate's update has changed some tokens' top-1 expert."""
    cfg = load_config(GSPOTrainConfig, None, [
        "sampler.num_steps=6", "rollout.image_size=32", "rollout.reference_size=16", "rollout.group_size=4", "rollout.chunk_size=2",
        "tasks.reference_size=16", "learner.learning_rate=5e-2", "learner.minibatches=2", "learner.clip_low=1e-5", "learner.clip_high=1e-5",
    ])
    torch.manual_seed(0)
    workers = LocalWorkers(cfg)
    result = run_iteration(workers, cfg, build_task_source(cfg.tasks, cfg.run.seed), 0, 0, workers.adapters())
    first, second = result.steps
    assert first.ratio_mean == pytest.approx(1.0, abs=1e-6) and first.ratio_max_deviation < 1e-5
    assert first.clip_fraction == 0.0 and first.expert_flip_rate == 0.0
    assert second.ratio_max_deviation > 1e-5 and second.clip_fraction > 0  # log-probs are means over ~3e3 dims: small ratios
    assert 0 < second.expert_flip_rate < 1
    record = iteration_metrics(result)
    assert record["step/0/ratio_mean"] == first.ratio_mean and record["offpolicy/clip_fraction"] == second.clip_fraction
    assert record["offpolicy/expert_flip_rate"] == second.expert_flip_rate
    assert record["grad_norm"] == pytest.approx((first.grad_norm + second.grad_norm) / 2)
