"""The sharded learner (learner.sharding: fsdp, FSDP2 over gloo on CPU) and block checkpointing: two
sharded ranks take the step one unsharded learner takes on all their chunks, through a checkpoint
gathered whole and restored into fresh shards; checkpointed blocks give the gradients of plain ones,
with dual-branch LoRA's layout, MoE-LoRA's routing and the captured attention maps intact."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from policies import AttentionSwitches, DualBranchLoRAConfig, FluxPolicy, LoRAConfig, PolicyConfig
from rl_align.core.checkpoints import Checkpoint
from rl_align.core.distributed import join_process_group
from rl_align.ippo.learner import LearnerConfig, window_log_probs
from rl_align.ippo.rollout import RolloutConfig, rollout_chunk, task_conditioning
from rl_align.ippo.tasks import SyntheticShapeTasks, TaskConfig
from rl_align.ippo.workers import LearnerRank
from samplers import GroupKey, SamplerConfig

pytestmark = pytest.mark.slow

SAMPLER = SamplerConfig(num_steps=6, window_size=2)
ROLLOUT = RolloutConfig(image_size=32, reference_size=16, group_size=4, chunk_size=2)
POLICY = PolicyConfig()  # LoRA on attention + MoE-LoRA (4 experts) on the FFN outputs
SHARDED = LearnerConfig(learning_rate=1e-2, sharding="fsdp", checkpoint_blocks=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rollouts(policy_cfg: PolicyConfig):
    """Four chunks of two groups, rolled out by an unsharded policy: [(task, transitions, advantages)]."""
    torch.manual_seed(0)
    policy = FluxPolicy.from_config(policy_cfg)
    tasks = SyntheticShapeTasks(TaskConfig(min_subjects=2, max_subjects=2, reference_size=16), seed=0)
    items = []
    for group in range(2):
        task = tasks.task(0, group)
        for ids, advantages in (((0, 1), [1.0, -0.5]), ((2, 3), [0.5, -1.0])):
            chunk = rollout_chunk(policy, task, GroupKey(0, 0, group), ids, [1, 2], SAMPLER, ROLLOUT)
            items.append((task, chunk.learner_input, torch.tensor(advantages).numpy()))
    return items


def _sharded_rank(rank: int, world: int, port: int, policy_cfg: PolicyConfig, steps, out_dir: str) -> None:
    """Step 1 on one sharded learner; its gathered checkpoint restored into a fresh sharded learner, which
    takes step 2; both checkpoints and the statistics saved by rank 0."""
    torch.set_num_threads(1)
    comm = join_process_group(f"tcp://127.0.0.1:{port}", rank, world, torch.device("cpu"))
    first = LearnerRank(policy_cfg, SHARDED, ROLLOUT, torch.device("cpu"))
    first.connect(comm)
    stats = first.update([steps[0][rank]], [4])
    after_first = first.checkpoint(1)
    second = LearnerRank(policy_cfg, SHARDED, ROLLOUT, torch.device("cpu"))
    second.connect(comm)
    second.restore(comm.broadcast(after_first))
    stats += second.update([steps[1][rank]], [4])
    after_second, published = second.checkpoint(2), second.adapter_state()
    if rank == 0:
        torch.save({"first": after_first, "second": after_second, "published": published, "stats": stats}, Path(out_dir) / "sharded.pt")
    else:
        assert after_first is None and after_second is None and published is None
    comm.close()


@pytest.mark.parametrize("policy_cfg", [POLICY, dataclasses.replace(POLICY, dtype="bfloat16")], ids=["fp32", "bf16-base"])
def test_two_sharded_ranks_take_the_unsharded_step_through_a_restored_checkpoint(tmp_path, policy_cfg):
    items = _rollouts(policy_cfg)
    # minibatch k: rank r holds one chunk of each group (the trainer's round robin), 4 samples in all
    steps = [[[items[0], items[2]][r:r + 1] for r in range(2)], [[items[1], items[3]][r:r + 1] for r in range(2)]]
    mp.spawn(_sharded_rank, args=(2, _free_port(), policy_cfg, steps, str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=False)

    single = LearnerRank(policy_cfg, dataclasses.replace(SHARDED, sharding="replicate", checkpoint_blocks=False), ROLLOUT, torch.device("cpu"))
    before = single.policy.adapter_state()
    expected_stats = single.update([[items[0], items[2]], [items[1], items[3]]], [4, 4])
    expected = single.checkpoint(2)

    got_stats = sharded["stats"]
    assert got_stats[0].ratio_mean == pytest.approx(1.0, abs=1e-6) and got_stats[0].ratio_max_deviation < 2e-6  # on-policy
    assert got_stats[1].ratio_max_deviation > 1e-5 and got_stats[1].expert_flip_rate > 0  # off-policy: the restored learner kept the first step
    for got, want in zip(got_stats, expected_stats):
        assert got.loss == pytest.approx(want.loss, rel=1e-4, abs=1e-8)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-4)
        assert got.expert_flip_rate == want.expert_flip_rate
    assert isinstance(sharded["second"], Checkpoint) and sharded["second"].adapters.keys() == expected.adapters.keys()
    moved = 0
    for name, value in expected.adapters.items():
        torch.testing.assert_close(sharded["second"].adapters[name], value, rtol=1e-4, atol=1e-6)
        assert torch.equal(sharded["published"][name], sharded["second"].adapters[name])
        moved += not torch.equal(value, before[name])
    assert moved > len(before) // 2  # most adapter tensors took both steps
    want_state, got_state = expected.optimizer["state"], sharded["second"].optimizer["state"]
    assert got_state.keys() == want_state.keys()
    for index, entry in want_state.items():
        assert float(got_state[index]["step"]) == float(entry["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):  # gathered whole, in the unsharded layout
            torch.testing.assert_close(got_state[index][key], entry[key], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(
    "policy_cfg",
    [POLICY, dataclasses.replace(POLICY, lora=LoRAConfig(enabled=False), dual_branch=DualBranchLoRAConfig(enabled=True))],
    ids=["lora+moe", "dual-branch+moe"],
)
def test_block_checkpointing_gives_the_gradients_of_the_plain_backward(policy_cfg):
    task = SyntheticShapeTasks(TaskConfig(min_subjects=2, max_subjects=2, reference_size=16), seed=0).task(0, 0)
    torch.manual_seed(0)
    plain = FluxPolicy.from_config(policy_cfg)
    with torch.no_grad():  # adapters away from their zero start, so every adapter tensor gets a gradient
        for p in plain.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpointed = FluxPolicy.from_config(policy_cfg)
    checkpointed.load_adapter_state(plain.adapter_state())
    checkpointed.enable_block_checkpointing()
    chunk = rollout_chunk(plain, task, GroupKey(0, 0, 0), (0, 1), [1, 2], SAMPLER, ROLLOUT).learner_input
    grads, routed = [], []
    for policy in (plain, checkpointed):
        velocity = policy.velocity_fn(task_conditioning(policy, task, ROLLOUT))
        out = window_log_probs(velocity, chunk.transitions, experts=chunk.experts)
        (out.log_probs * torch.tensor([[1.0, -2.0], [0.5, 3.0]])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
        routed.append((out.routed_tokens, out.expert_flips))
    assert routed[0] == routed[1] and routed[0][0] > 0
    assert grads[0].keys() == grads[1].keys()
    nonzero = 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)
        nonzero += bool(grad.abs().sum() > 0)
    # all but the last block's condition-token query branch, which no output of the noisy tokens reads
    assert nonzero >= len(grads[0]) - 2


def test_block_checkpointing_keeps_the_attention_maps_and_their_gradient():
    """IDAR's Dice loss reads maps captured inside the blocks: under checkpointing they are the same
    maps with the same gradients (the capture inside the recompute adds nothing to the call's maps)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = FluxPolicy.from_config(POLICY)
        with torch.no_grad():
            for index, p in enumerate(policy.trainable_parameters()):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(index)))
        if checkpointing:
            policy.enable_block_checkpointing()
        prompts = policy.encode_prompts(["a red circle and a blue square"], item_phrases=["a red circle", "a blue square"])
        references = [torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        conditioning = policy.condition(prompts, references, 32, 32)
        x_t = torch.randn(2, *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(5))
        out = policy(x_t, torch.tensor([0.5, 0.3]), conditioning, AttentionSwitches(capture=True))
        (out.velocity.square().mean() + 10 * out.attention_maps.square().mean()).backward()
        results.append((out.attention_maps.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}))
    (maps, grads), (checkpointed_maps, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_maps, maps, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7)
