"""The supervised warm-start stages: the pure schedules, batching, and each stage's objective on the tiny
policy with the synthetic data."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from policies import AttentionSwitches, FluxPolicy
from rl_align.core.config import ConfigError, load_config
from rl_align.core.distributed import Communicator
from rl_align.core.optim import make_optimizer
from rl_align.sft.builders import SYNTHETIC_CATEGORIES, build_synthetic_manifest
from rl_align.core.flow_matching import TimestepConfig, flow_matching_pair, sample_timesteps
from rl_align.sft.config import CurriculumConfig, DiptychConfig, OptimConfig, SFTConfig
from rl_align.sft.data import BatchStream, SFTDataConfig, bucket_size, curriculum_epochs, curriculum_schedule, epoch_steps, subject_count_limit
from rl_align.sft.manifest import SampleRecord, load_manifest, write_manifest
from rl_align.sft.objective import StageObjective, learning_rate_at, train_step
from rl_align.sft.stages import STAGES, diptych_source, stage_policy
from rl_align.sft.trainer import _RankData
from samplers import euler_step
from samplers.schedule import static_time_shift


# ---- pure parts -------------------------------------------------------------------------------------------


def test_flow_matching_target_is_the_samplers_velocity():
    """v = eps - x0: an Euler step of the samplers with the target velocity from x_t reaches x0 at t=0 and
    the noise at t=1, for every sample's own t."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 6, 6, generator=gen), torch.randn(3, 4, 6, 6, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.93])
    x_t, v = flow_matching_pair(x0, noise, t)
    assert torch.allclose(v, noise - x0)
    for i in range(3):
        assert torch.allclose(x_t[i], (1 - t[i]) * x0[i] + t[i] * noise[i])
        assert torch.allclose(euler_step(x_t[i], v[i], float(t[i]), 0.0), x0[i], atol=1e-6)
        assert torch.allclose(euler_step(x_t[i], v[i], float(t[i]), 1.0), noise[i], atol=1e-6)


def test_timestep_sampling_follows_its_distribution():
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, gen, TimestepConfig(sampling="logit_normal", logit_mean=0.5, logit_std=0.8))
    logits = torch.log(t / (1 - t))
    assert abs(float(logits.mean()) - 0.5) < 0.03 and abs(float(logits.std()) - 0.8) < 0.03
    uniform = sample_timesteps(20000, gen, TimestepConfig(sampling="uniform"))
    assert 0 < float(uniform.min()) and float(uniform.max()) < 1 and abs(float(uniform.mean()) - 0.5) < 0.01
    # the shift is the samplers' static shift applied to the same draws
    base = sample_timesteps(100, torch.Generator().manual_seed(1), TimestepConfig(sampling="uniform"))
    shifted = sample_timesteps(100, torch.Generator().manual_seed(1), TimestepConfig(sampling="uniform", shift=3.0))
    assert torch.allclose(shifted, static_time_shift(base, 3.0).clamp(1e-5, 1 - 1e-5), atol=1e-6)


def test_two_stage_learning_rate_and_warmup():
    cfg = OptimConfig(learning_rate=1e-4, second_learning_rate=5e-5, first_stage_fraction=0.7)
    rates = [learning_rate_at(s, 10, cfg) for s in range(10)]
    assert rates == [1e-4] * 7 + [5e-5] * 3  # MS-CustomNet: 7 epochs at 1e-4, then 3 at 5e-5
    assert [learning_rate_at(s, 10, OptimConfig(learning_rate=1e-4)) for s in (0, 9)] == [1e-4, 1e-4]
    warm = OptimConfig(learning_rate=1e-3, warmup_steps=3)
    assert [learning_rate_at(s, 10, warm) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_subject_count_curriculum_matches_eq_15():
    # K_min 2, K_max 5, E 10, gamma 1 (the paper's setting), e = 1..10, by hand: 2 + floor(3 e / 10)
    assert [subject_count_limit(e, 10, 2, 5, 1.0) for e in range(1, 11)] == [2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    for gamma in (0.5, 1.0, 2.0):
        for e in range(1, 21):
            expected = max(2, 2 + math.floor((e / 20) ** gamma * 3))
            assert subject_count_limit(e, 20, 2, 5, gamma) == expected
        assert subject_count_limit(20, 20, 2, 5, gamma) == 5  # e = E: the last epoch trains K_max
    assert subject_count_limit(5, 10, 2, 5, 2.0) == 2  # a slow start for gamma > 1 (0.25 * 3 -> 0)
    assert subject_count_limit(5, 10, 2, 5, 0.5) == 4  # a fast start for gamma < 1 (0.707 * 3 -> 2)
    with pytest.raises(ValueError):
        subject_count_limit(1, 10, 3, 2, 1.0)


def test_curriculum_schedule_reaches_k_max_in_the_last_epoch():
    """Stream epochs count from 0: stream epoch i is the paper's e = i + 1, so of E = 10 epochs the tenth
    trains K_max, and epochs past E stay there."""
    limit = curriculum_schedule(10, 2, 5, 1.0)
    assert [limit(i) for i in range(10)] == [2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    assert [limit(i) for i in (10, 11, 50)] == [5, 5, 5]
    slow = curriculum_schedule(4, 1, 3, 2.0)  # by hand: 1 + floor((e / 4)^2 * 2) = 1, 1, 2, 3
    assert [slow(i) for i in range(5)] == [1, 1, 2, 3, 3]
    assert curriculum_schedule(1, 2, 5, 1.0)(0) == 5  # one epoch: it is the last
    with pytest.raises(ValueError):
        curriculum_schedule(0, 2, 5, 1.0)


def test_curriculum_epochs_is_the_fixed_point_of_the_epochs_the_limits_make():
    """Batches per epoch by limit (fewer with a smaller limit, as merged buckets give), 30 steps; by hand:
    one process: no limit 10 -> 3 epochs; E 3 gives K 1, 2, 3: 5 + 8 + 10 < 30 -> 4 epochs; E 4 gives K
    1, 2, 2, 3: 5 + 8 + 8 + 10 >= 30 -> 4 epochs. Two processes halve each epoch (rounding up): no limit
    6 epochs of 5; E 6 gives 3, 3, 4, 4, 4, 5, 5 (K_max from the sixth on) -> 8 epochs; E 8 gives K 1, 1, 1,
    2, 2, 2, 2, 3: 3 + 3 + 3 + 4 + 4 + 4 + 4 + 5 = 30 -> 8."""
    counts = {None: 10, 1: 5, 2: 8, 3: 10}
    batches = lambda epoch, limit: counts[limit]  # noqa: E731
    schedule = lambda epochs: curriculum_schedule(epochs, 1, 3, 1.0)  # noqa: E731
    assert epoch_steps(30, 1, lambda e: 10) == [10, 10, 10] and epoch_steps(31, 1, lambda e: 10) == [10] * 4
    assert epoch_steps(30, 2, lambda e: 9) == [5] * 6  # rank 0 takes ceil(9 / 2) batches of each epoch
    assert curriculum_epochs(30, 1, batches, schedule) == 4
    limit = schedule(4)
    assert epoch_steps(30, 1, lambda e: batches(e, limit(e))) == [5, 8, 8, 10]
    assert curriculum_epochs(30, 2, batches, schedule) == 8
    # a batch count that breaks the monotony: E 3 makes 5 epochs and E 5 makes 3; the smaller of the cycle
    cycle = {None: 10, 3: 6, 5: 10}
    assert curriculum_epochs(30, 1, lambda epoch, limit: cycle[limit], lambda epochs: lambda epoch: epochs) == 3
    with pytest.raises(ValueError, match="no batches"):
        epoch_steps(5, 1, lambda e: 0)


def test_diptych_curriculum_phases():
    cfg = DiptychConfig(single_steps=100, mixed_steps=1000, mixed_single_fraction=0.2)
    assert {diptych_source(s, cfg, 0) for s in range(100)} == {"single"}
    mixed = [diptych_source(s, cfg, 0) for s in range(100, 1100)]
    assert set(mixed) == {"single", "random"}
    assert abs(mixed.count("single") / len(mixed) - 0.2) < 0.04
    assert {diptych_source(s, cfg, 0) for s in range(1100, 1200)} == {"same_category"}
    assert mixed == [diptych_source(s, cfg, 0) for s in range(100, 1100)]  # seeded: a resumed run agrees


def test_default_condition_categories_are_the_synthetic_shapes():
    assert SFTConfig().policy.condition_categories == SYNTHETIC_CATEGORIES


def test_stage_policies():
    base = SFTConfig().policy
    diptych = stage_policy(base, "diptych")
    assert not diptych.lora.enabled and not diptych.moe_lora.enabled and diptych.dual_branch.enabled  # MUSAR: nothing adapts prompt tokens
    assert diptych.attention.static_routing and not diptych.attention.temperature
    position = stage_policy(base, "position_id")
    assert position.position_scheme == "condition_id" and position.attention.temperature and not position.attention.static_routing
    for stage in ("single", "idar", "routing"):
        assert stage_policy(base, stage) == base


def test_stages_train_in_the_attention_mode_of_the_policy_they_produce():
    """The objective's switches: the trained policy's mode (static routing, temperature) plus the stage's
    captures, so warm start, RL and evaluation run one model."""
    def switches(stage, *overrides):
        cfg = load_config(SFTConfig, None, [f"stage={stage}", *overrides])
        policy = FluxPolicy.from_config(stage_policy(cfg.policy, stage))
        return StageObjective(policy, dataclasses.replace(cfg, policy=policy.cfg)).switches

    assert switches("diptych") == AttentionSwitches(static_routing=True)
    assert switches("position_id") == AttentionSwitches(temperature=True)
    assert switches("idar", "policy.attention.temperature=true") == AttentionSwitches(capture=True, temperature=True)
    assert switches("routing") == AttentionSwitches(capture_routing=True)
    with pytest.raises(ConfigError, match="dynamic_routing is an inference-time mode"):
        load_config(SFTConfig, None, ["policy.attention.dynamic_routing=true"])


def test_bucket_size_keeps_aspect_and_multiple():
    assert bucket_size(640, 480, 512, 16) == (512, 688)  # (H, W): shorter side 512, 682.7 -> 688
    assert bucket_size(128, 64, 64, 16) == (64, 128)  # a diptych stays 1:2
    assert bucket_size(10, 10, 64, 16) == (64, 64)


# ---- data -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """48 coloured-shape samples with 1-3 subjects, 32 px targets and 16 px references."""
    folder = tmp_path_factory.mktemp("synthetic")
    path = build_synthetic_manifest(folder, samples=48, min_subjects=1, max_subjects=3, image_size=32, reference_size=16, seed=3)
    return path, load_manifest(path, ("circle", "square", "triangle", "diamond"))


DATA = SFTDataConfig(target_size=32, reference_size=16, size_multiple=16, batch_size=4)


def test_batches_share_subject_count_and_size_and_cover_each_epoch(synthetic, tmp_path):
    path, samples = synthetic
    # add wide (diptych-shaped) samples: they must land in their own buckets
    wide = []
    from PIL import Image

    for i, sample in enumerate(samples[:6]):
        target = np.asarray(Image.open(path.parent / sample.target))
        Image.fromarray(np.concatenate([target, target], axis=1)).save(tmp_path / f"wide{i}.png")
        masks = []
        for j, s in enumerate(sample.subjects):
            mask = np.asarray(Image.open(path.parent / s.mask))
            Image.fromarray(np.concatenate([mask, np.zeros_like(mask)], axis=1)).save(tmp_path / f"wide{i}-{j}.png")
            masks.append(dataclasses.replace(s, reference=str(path.parent / s.reference), mask=f"wide{i}-{j}.png",
                                             reference_mask=str(path.parent / s.reference_mask)))
        wide.append(SampleRecord(f"wide{i}.png", sample.prompt, tuple(masks)))
    relocated = [
        SampleRecord(str(path.parent / s.target), s.prompt, tuple(
            dataclasses.replace(x, reference=str(path.parent / x.reference), mask=str(path.parent / x.mask),
                                reference_mask=str(path.parent / x.reference_mask)) for x in s.subjects))
        for s in samples
    ]
    manifest = write_manifest(relocated + wide, tmp_path / "mixed.jsonl")
    records = load_manifest(manifest)
    stream = BatchStream(records, tmp_path, DATA, seed=0)
    for epoch in range(2):
        plan = stream.plan(epoch)
        seen = sorted(p.sample for batch in plan for p in batch)
        assert seen == list(range(len(records)))  # every sample once per epoch, none dropped
        for planned in plan:
            keys = {(len(records[p.sample].subjects), stream.sizes[p.sample]) for p in planned}
            assert len(keys) == 1 and 1 <= len(planned) <= DATA.batch_size
    assert stream.plan(0) != stream.plan(1)  # reshuffled each epoch
    shapes = set()
    for planned in stream.plan(0):
        batch = stream.load(planned)
        b, r = len(batch.prompts), len(batch.references)
        assert batch.masks.shape[:2] == (b, r) and batch.masks.shape[2:] == batch.targets.shape[2:]
        assert all(ref.shape == (b, 3, 16, 16) for ref in batch.references)
        assert set(batch.masks.unique().tolist()) <= {0.0, 1.0}
        shapes.add(tuple(batch.targets.shape[2:]))
    assert shapes == {(32, 32), (32, 64)}


def test_stream_resumes_at_the_same_batch(synthetic):
    path, samples = synthetic
    stream = BatchStream(samples, path.parent, DATA, seed=1)
    for _ in range(15):  # past the end of the first epoch (12 samples per batch count bucket at most)
        stream.next()
    state = stream.state()
    expected = stream.next()
    other = BatchStream(samples, path.parent, DATA, seed=1)
    other.load_state(state)
    again = other.next()
    assert again.lines == expected.lines and torch.equal(again.targets, expected.targets)


def test_curriculum_keeps_a_subset_of_at_most_k_subjects_in_order(synthetic):
    path, samples = synthetic
    stream = BatchStream(samples, path.parent, DATA, seed=0, subject_limit=lambda epoch: 1 + epoch)
    for epoch, limit in ((0, 1), (1, 2), (2, 3)):
        plan = stream.plan(epoch)
        for planned in (p for batch in plan for p in batch):
            count = len(samples[planned.sample].subjects)
            assert len(planned.subjects) == min(count, limit)
            assert list(planned.subjects) == sorted(set(planned.subjects))
    batch = stream.load(stream.plan(0)[0])
    assert len(batch.references) == 1
    first = stream.plan(0)[0][0]
    kept = samples[first.sample].subjects[first.subjects[0]]
    assert batch.captions[0] == (kept.caption,)


def _curriculum_stream(synthetic, steps: int, rank: int = 0, world: int = 1) -> BatchStream:
    """Process ``rank`` of ``world``'s stream as the trainer builds it, with the curriculum K 1 -> 3."""
    path, samples = synthetic
    cfg = SFTConfig(data=DATA, steps=steps, curriculum=CurriculumConfig(enabled=True, min_subjects=1, max_subjects=3, gamma=1.0))
    data = _RankData(cfg, path, path.parent, Communicator(rank, world, torch.device("cpu")))
    return data.stream(samples, path.parent, curriculum=True)


def _span(stream: BatchStream) -> int:
    """E of a stream's curriculum: the first epoch at K_max (3) is e = E."""
    return next(i for i in range(1000) if stream.subject_limit(i) == 3) + 1


def test_subject_curriculum_trains_k_max_in_the_last_epoch_of_the_run(synthetic):
    """40 steps over the 48 samples (1-3 subjects, 12-14 batches of 4 an epoch) touch 4 epochs; the
    curriculum spans them all and the last trains K_max: its batches hold 3-subject samples, which
    no earlier epoch does, and the first keeps one subject."""
    stream = _curriculum_stream(synthetic, steps=40)
    assert _span(stream) == 4
    assert [stream.subject_limit(i) for i in range(6)] == [1, 2, 2, 3, 3, 3]
    seen: dict[int, set[int]] = {}
    for _ in range(40):
        batch = stream.next()
        seen.setdefault(stream.epoch, set()).add(len(batch.references))
    assert sorted(seen) == [0, 1, 2, 3]  # the run traverses E epochs
    assert seen[0] == {1} and 3 in seen[3] and all(3 not in seen[e] for e in (0, 1, 2))
    assert stream.subject_limit(stream.epoch) == 3
    path, samples = synthetic
    off = _RankData(SFTConfig(data=DATA, steps=40), path, path.parent, Communicator(0, 1, torch.device("cpu")))
    assert off.stream(samples, path.parent, curriculum=True).subject_limit is None  # curriculum.enabled false


def test_subject_curriculum_spans_the_epochs_of_a_data_parallel_run(synthetic):
    """Under 2 processes each step takes 2 of an epoch's batches: the same 40 steps traverse about twice
    the epochs (6: epochs of 6-7 steps), and E is that count: rank 0 ends the run in epoch E, at K_max."""
    steps = 40
    spans = {}
    for world in (1, 2):
        stream = _curriculum_stream(synthetic, steps, rank=0, world=world)
        spans[world] = _span(stream)
        limits = []
        for _ in range(steps):
            stream.next()
            limits.append(stream.subject_limit(stream.epoch))
        assert stream.epoch + 1 == spans[world]  # the run's last epoch is the curriculum's last
        assert limits[-1] == 3 and limits.count(3) < steps / 2  # reached at the end, not early
    assert spans == {1: 4, 2: 6}
    assert 2 * spans[1] - 2 <= spans[2] <= 2 * spans[1]


def test_every_rank_finds_the_same_subject_curriculum(synthetic):
    """Under 3 processes the ranks' shares of an epoch differ (13 batches: 5, 4, 4), yet each rank
    counts E with rank 0's share, so all follow one curriculum."""
    steps = 40
    streams = [_curriculum_stream(synthetic, steps, rank=rank, world=3) for rank in range(3)]
    shares = {tuple(len(s.plan(e)[s.rank :: 3]) for s in streams) for e in range(8)}
    assert any(len(set(share)) > 1 for share in shares)  # the shares really differ
    limits = [[s.subject_limit(e) for e in range(20)] for s in streams]
    assert limits[0] == limits[1] == limits[2]
    assert _span(streams[0]) == 9  # rank 0: 40 steps of 4-5 batches


# ---- stages on the tiny policy ----------------------------------------------------------------------------


def _config(stage: str, **changes) -> SFTConfig:
    defaults = {"optim": OptimConfig(learning_rate=1e-2)}
    cfg = SFTConfig(stage=stage, data=DATA, **{**defaults, **changes})
    return dataclasses.replace(cfg, policy=stage_policy(cfg.policy, stage))


def _fixed_batch(synthetic, subjects: int):
    path, samples = synthetic
    chosen = [s for s in samples if len(s.subjects) == subjects][:4]
    stream = BatchStream(chosen, path.parent, DATA, seed=0)
    return stream.load([p for batch in stream.plan(0) for p in batch])


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_lowers_its_loss_on_a_fixed_batch(stage, synthetic):
    cfg = _config(stage)
    policy = FluxPolicy.from_config(cfg.policy)
    objective = StageObjective(policy, cfg)
    batch = _fixed_batch(synthetic, subjects=2)
    key = 1234
    with torch.no_grad():
        before = objective.batch_loss(batch, key, backward=False)
    optimizer = make_optimizer(policy.trainable_parameters(), cfg.optim)
    for _ in range(6):
        stats = train_step(objective, optimizer, batch, key, cfg.optim.learning_rate)
        assert not stats.skipped
    with torch.no_grad():
        after = objective.batch_loss(batch, key, backward=False)
    assert float(after.total) < float(before.total) - 1e-3, (stage, before.floats(), after.floats())
    if stage == "idar":
        assert float(before.attention) > 0 and float(after.attention) < float(before.attention)  # maps move toward the masks
    if stage == "routing":
        assert float(before.routing) > 0 and float(after.routing) < float(before.routing)
    if stage not in ("idar", "routing"):
        assert float(before.attention) == float(before.routing) == 0


def test_idar_dice_alone_moves_the_attention_maps_toward_the_masks(synthetic):
    """With a large lambda, the regularized maps overlap their own subject's mask more than before."""
    from policies import dice_loss, mask_tokens

    cfg = _config("idar", idar=dataclasses.replace(SFTConfig().idar, attention_weight=5.0))
    policy = FluxPolicy.from_config(cfg.policy)
    objective = StageObjective(policy, cfg)
    batch = _fixed_batch(synthetic, subjects=2)

    def overlap() -> tuple[float, float]:
        noise, t = objective.flow_sample(batch, 7)
        with torch.no_grad():
            conditioning = objective.conditioning(batch)
            x_t, _ = flow_matching_pair(policy.encode_images(batch.targets), noise, t)
            maps = policy(x_t, t, conditioning, objective.switches).attention_maps
        masks = mask_tokens(batch.masks, conditioning.noisy_grid)
        inside = float((maps * masks).sum() / masks.sum())
        return inside, float(dice_loss(maps, masks))

    inside_before, dice_before = overlap()
    optimizer = make_optimizer(policy.trainable_parameters(), cfg.optim)
    for _ in range(8):
        train_step(objective, optimizer, batch, 7, cfg.optim.learning_rate)
    inside_after, dice_after = overlap()
    assert dice_after < dice_before - 0.05
    assert inside_after > inside_before


@pytest.mark.parametrize("stage", ["position_id", "routing"])
def test_phrase_stages_give_the_per_sample_mean(stage, synthetic):
    """position_id splits a batch by phrase positions, routing takes each sample's own spans in one
    group; either way the batch loss is the mean of the samples' losses."""
    cfg = _config(stage)
    policy = FluxPolicy.from_config(cfg.policy)
    objective = StageObjective(policy, cfg)
    path, samples = synthetic
    mixed = [s for s in samples if len(s.subjects) == 1][:4]
    stream = BatchStream(mixed, path.parent, DATA, seed=0)
    batch = stream.load([p for b in stream.plan(0) for p in b])
    # different shapes and colours put the phrases on different tokens
    assert len({policy.item_spans(p, c) for p, c in zip(batch.prompts, batch.captions)}) > 1
    assert len(objective.groups(batch)) == (1 if stage == "routing" else len({policy.item_spans(p, c) for p, c in zip(batch.prompts, batch.captions)}))
    noise, t = objective.flow_sample(batch, 5)
    with torch.no_grad():
        whole = objective.batch_loss(batch, 5, backward=False)
        each = [objective.loss(batch.select([i]), noise[[i]], t[[i]]) for i in range(len(batch.prompts))]
    assert float(whole.total) == pytest.approx(sum(float(e.total) for e in each) / len(each), rel=1e-5)


def test_stage_checks_name_the_lines_it_cannot_use(synthetic):
    path, samples = synthetic
    cfg = _config("position_id", policy=dataclasses.replace(SFTConfig().policy, condition_categories=("circle",)))
    policy = FluxPolicy.from_config(cfg.policy)
    problems = StageObjective(policy, cfg).check_samples(samples)
    assert problems and all("have no condition id" in p.reason for p in problems)
    assert {p.line for p in problems} == {s.line for s in samples if any(x.category != "circle" for x in s.subjects)}
    routing = StageObjective(FluxPolicy.from_config(_config("routing").policy), _config("routing"))
    broken = dataclasses.replace(samples[0], prompt="something else entirely", line=99)
    [problem] = routing.check_samples([broken])
    assert problem.line == 99 and "does not occur in the prompt" in problem.reason


# ---- shipped configs --------------------------------------------------------------------------------------

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sft").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_sft_configs_load(path):
    cfg = load_config(SFTConfig, path)
    assert cfg.stage in STAGES
    assert cfg.data.target_size % cfg.data.size_multiple == 0


def test_paper_presets_carry_the_paper_settings():
    folder = CONFIGS[0].parent
    single = load_config(SFTConfig, folder / "multicrafter_single.yaml")
    idar = load_config(SFTConfig, folder / "multicrafter_idar_human.yaml")
    assert (single.optim.learning_rate, idar.optim.learning_rate) == (3e-5, 1e-5)  # MultiCrafter Appendix B
    assert single.optim.weight_decay == idar.optim.weight_decay == 1e-2
    assert (single.data.target_size, single.data.reference_size) == (512, 320)
    assert single.policy.lora.rank == single.policy.moe_lora.rank == 512 and single.policy.moe_lora.num_experts == 4
    assert idar.idar.attention_weight == 0.3 and idar.stage == "idar"
    musar = stage_policy(load_config(SFTConfig, folder / "musar_diptych.yaml").policy, "diptych")
    assert (musar.dual_branch.noisy_rank, musar.dual_branch.condition_rank) == (4, 128)
    assert load_config(SFTConfig, folder / "anystory_routing.yaml").routing.routing_weight == 0.1
    coco = load_config(SFTConfig, folder / "ms_customnet_coco.yaml")
    assert coco.curriculum.enabled and (coco.curriculum.min_subjects, coco.curriculum.max_subjects, coco.curriculum.gamma) == (2, 5, 1.0)
    assert (coco.optim.learning_rate, coco.optim.second_learning_rate, coco.optim.first_stage_fraction) == (1e-4, 5e-5, 0.7)
    ofa = load_config(SFTConfig, folder / "one_for_all_position_id.yaml")
    assert ofa.policy.condition_categories == ("face", "upper garment", "lower garment", "bag")
    assert ofa.optim.learning_rate == 5e-6


def test_face_references_are_cropped_to_their_reference_mask(tmp_path):
    """MultiCrafter uses the face crop as a human's reference: a subject of a crop category with a
    reference_mask is cut to the mask's square box before resizing; other categories stay whole."""
    from PIL import Image

    reference = np.full((32, 32, 3), 255, dtype=np.uint8)
    reference[8:16, 20:28] = (200, 30, 30)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:16, 20:28] = 255
    Image.fromarray(reference).save(tmp_path / "ref.png")
    Image.fromarray(mask).save(tmp_path / "ref-mask.png")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "target.png")
    Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(tmp_path / "mask.png")
    line = '{"target": "target.png", "prompt": "p", "subjects": [{"reference": "ref.png", "category": "%s", "caption": "c", "mask": "mask.png", "reference_mask": "ref-mask.png"}]}'
    (tmp_path / "m.jsonl").write_text(line % "face" + "\n" + line % "dog" + "\n")
    samples = load_manifest(tmp_path / "m.jsonl")
    cfg = SFTDataConfig(target_size=16, reference_size=16, size_multiple=16, batch_size=1, crop_margin=0.0)
    stream = BatchStream(samples, tmp_path, cfg, seed=0)
    face, dog = (stream.load([plan]).references[0][0] for plan in sorted((p for b in stream.plan(0) for p in b), key=lambda p: p.sample))
    red = torch.tensor([200, 30, 30]).float()[:, None, None] / 255
    assert (face - red).abs().max() < 0.02  # only the masked square is left
    assert float((dog - 1).abs().amax(dim=0).lt(0.02).float().mean()) > 0.8  # the whole white reference
