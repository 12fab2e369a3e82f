"""The Ray actors on a local cluster: a rollout worker that dies is restarted and its call retried with
the current weights; data-parallel learners (gloo), replicated or sharded, take the same step as one learner; rollout outputs go
from worker to worker by reference."""

from __future__ import annotations

import dataclasses
import time

import pytest
import ray
import torch

from policies import PolicyConfig
from rewards import RewardConfig
from rewards.config import WeightsConfig
from rl_align.ippo.actors import Learner, RewardWorker, RolloutWorker, actor_options
from rl_align.ippo.rollout import RolloutConfig
from rl_align.ippo.learner import LearnerConfig
from rl_align.ippo.tasks import SyntheticShapeTasks, TaskConfig
from rl_align.ippo.config import WorkerConfig
from samplers import GroupKey, SamplerConfig

pytestmark = pytest.mark.slow

SAMPLER = SamplerConfig(num_steps=6, window_size=2)
ROLLOUT = RolloutConfig(image_size=32, reference_size=16, group_size=4, chunk_size=2)
TASKS = SyntheticShapeTasks(TaskConfig(reference_size=16), seed=0)


@pytest.fixture(scope="module")
def cluster():
    # Logical CPUs beyond the 2 real cores: the actors here are mostly idle, waiting for each other.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_dead_rollout_worker_is_restarted_and_the_call_retried(cluster):
    options = actor_options(WorkerConfig(max_restarts=2), gpus=0.0)
    worker = RolloutWorker.options(**options).remote(PolicyConfig(), SAMPLER, ROLLOUT, 1, 0.0)
    learner = Learner.remote(PolicyConfig(), LearnerConfig(), ROLLOUT, 1, 0.0)
    weights = ray.get(learner.adapter_state.remote())
    for value in weights.values():
        value.add_(0.05)  # weights that differ from a fresh worker's
    adapters = ray.put(weights)
    task = TASKS.task(0, 0)
    args = (task, GroupKey(0, 0, 0), (0, 1), [0, 1])
    expected_images, expected_transitions = ray.get(worker.rollout.remote(1, [adapters], *args))

    in_flight = worker.rollout.remote(1, [adapters], *args)
    time.sleep(0.5)
    ray.kill(worker, no_restart=False)  # the process dies mid-call; Ray restarts it and retries the call
    retried_images, retried_transitions = ray.get(in_flight, timeout=300)
    assert torch.equal(retried_transitions.transitions[-1].x_next, expected_transitions.transitions[-1].x_next)  # same weights reloaded
    assert (retried_images == expected_images).all()


def test_reward_worker_scores_a_chunk(cluster):
    worker = RewardWorker.remote(RewardConfig(weights=WeightsConfig(colour_target=1.0)), WorkerConfig())
    rollout = RolloutWorker.remote(PolicyConfig(), SAMPLER, ROLLOUT, 1, 0.0)
    learner = Learner.remote(PolicyConfig(), LearnerConfig(), ROLLOUT, 1, 0.0)
    adapters = ray.put(ray.get(learner.adapter_state.remote()))
    task = TASKS.task(0, 1)
    images, _ = rollout.rollout.remote(0, [adapters], task, GroupKey(0, 0, 1), (0, 1), [0, 1])
    result = ray.get(worker.score.remote(images, task))  # the images' reference, resolved by Ray on the worker
    assert result.rewards.shape == (2,) and set(result.components) == {"colour_target"}
    assert (result.rewards <= 0).all() and (result.rewards >= -1).all()


@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_data_parallel_learners_match_a_single_learner(cluster, sharding):
    policy_cfg, learner_cfg = PolicyConfig(), LearnerConfig(learning_rate=1e-2)
    single = Learner.remote(policy_cfg, learner_cfg, ROLLOUT, 1, 0.0)
    ranks = [Learner.remote(policy_cfg, dataclasses.replace(learner_cfg, sharding=sharding), ROLLOUT, 1, 0.0) for _ in range(2)]
    address = ray.get(ranks[0].rendezvous.remote())
    ray.get([r.join.remote(i, 2, address) for i, r in enumerate(ranks)])
    rollout = RolloutWorker.remote(policy_cfg, SAMPLER, ROLLOUT, 1, 0.0)
    adapters = ray.put(ray.get(single.adapter_state.remote()))
    items = []
    for g in range(2):
        task = TASKS.task(0, g)
        for ids, adv in (((0, 1), [1.0, -0.5]), ((2, 3), [0.5, -1.0])):
            _, transitions = rollout.rollout.remote(0, [adapters], task, GroupKey(0, 0, g), ids, [0, 1])
            items.append((task, [transitions], torch.tensor(adv).numpy()))
    # two optimizer steps (minibatches of one group each): the second is off-policy
    single_stats, single_adapters = single.update.remote([items[:2], items[2:]], [4, 4])
    single_stats = ray.get(single_stats)
    (stats0, adapters0), (stats1, adapters1) = (
        ranks[0].update.remote([items[0:1], items[2:3]], [4, 4]), ranks[1].update.remote([items[1:2], items[3:4]], [4, 4])
    )
    dp_stats = ray.get([stats0, stats1])
    assert len(single_stats) == 2 and single_stats[0].ratio_mean == pytest.approx(1.0, abs=1e-6)
    assert single_stats[1].ratio_max_deviation > 0  # the second step sees the first one's update
    assert dp_stats[0] == dp_stats[1]  # both ranks agree on every statistic
    assert ray.get(adapters1) is None  # rank 0 alone publishes the new weights
    published = ray.get(adapters0)
    for dp, one in zip(dp_stats[0], single_stats):
        assert dp.loss == pytest.approx(one.loss, rel=1e-5, abs=1e-9)
        assert dp.grad_norm == pytest.approx(one.grad_norm, rel=1e-4)
        assert dp.ratio_max_deviation == pytest.approx(one.ratio_max_deviation, rel=1e-4, abs=1e-9)
    expected, got0, got1 = ray.get([single_adapters, ranks[0].adapter_state.remote(), ranks[1].adapter_state.remote()])
    assert got1 is None  # rank 0 alone answers (sharded ranks gather together)
    assert expected.keys() == got0.keys() == published.keys()
    for name in expected:
        torch.testing.assert_close(got0[name], expected[name], rtol=0, atol=1e-6)
        assert torch.equal(published[name], got0[name])


def test_a_frozen_rollout_worker_is_restarted_within_its_timeout_and_the_call_retried(cluster):
    """SIGSTOP freezes a rollout worker mid-iteration: the driver's wait does not hang; after
    rollout_timeout_s without progress the worker is killed, Ray restarts it and retries the call, and the
    retried chunk equals what a healthy worker rolls out."""
    import os
    import signal

    from rl_align.ippo.actors import RayWorkers
    from rl_align.ippo.config import GSPOTrainConfig

    cfg = GSPOTrainConfig(
        sampler=SAMPLER, rollout=ROLLOUT, tasks=TaskConfig(reference_size=16),
        workers=WorkerConfig(max_restarts=2, rollout_timeout_s=3.0, cpus_per_worker=0.5),
    )
    workers = RayWorkers(cfg)
    try:
        adapters, task = workers.adapters(), TASKS.task(0, 0)
        args = (adapters, task, GroupKey(0, 0, 0), (0, 1), [0, 1])
        os.kill(workers.pids["rollout"][0], signal.SIGSTOP)
        images, _ = workers.rollout(0, 0, *args)
        started = time.monotonic()
        workers.wait([images])
        waited = time.monotonic() - started
        assert workers.restarts == 1 and 3.0 <= waited < 120
        healthy, _ = workers.rollout(0, 0, *args)
        retried, expected = workers.fetch([images, healthy])
        assert (retried == expected).all()
    finally:
        workers.close()
