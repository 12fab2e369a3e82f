"""Config system: precedence, errors that name the key, and the resolved-config round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from rl_align.core.config import ConfigError, apply_overrides, load_config, save_config
from rl_align.core.errors import RunFolderError
from rl_align.core.runs import RunConfig, create_run_dir
from rl_align.ippo.config import GSPOTrainConfig


@dataclass(frozen=True)
class Inner:
    rate: float = 1e-3
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    path: str | None = None


@dataclass(frozen=True)
class Outer:
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_then_yaml_then_cli(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("steps: 20\ninner:\n  rate: 1e-4\n  mode: b\n")
    cfg = load_config(Outer, yaml_file)
    assert cfg == Outer(steps=20, inner=Inner(rate=1e-4, mode="b"))  # yaml over defaults; "1e-4" parsed as float
    cfg = load_config(Outer, yaml_file, ["steps=30", "inner.sizes=[3,4,5]", "flag=true", "inner.path=/x"])
    assert cfg.steps == 30 and cfg.flag is True  # cli over yaml
    assert cfg.inner == Inner(rate=1e-4, mode="b", sizes=(3, 4, 5), path="/x")  # untouched yaml keys stay
    assert apply_overrides(cfg, ["inner.path=null"]).inner.path is None


@pytest.mark.parametrize(
    "override, words",
    [
        ("inner.rte=1", ["inner.rte", "did you mean 'rate'", "rate, mode, sizes, path"]),
        ("stepz=1", ["stepz", "steps, flag, inner"]),
        ("steps=abc", ["steps", "integer", "abc"]),
        ("flag=maybe", ["flag", "boolean"]),
        ("inner.mode=c", ["inner.mode", "'a', 'b'"]),
        ("inner.sizes=[1,x]", ["inner.sizes[1]", "integer"]),
        ("inner=3", ["config file 3", "'inner', a section"]),
        ("steps.x=3", ["steps", "not a section"]),
        ("steps", ["key=value"]),
        ("inner.rate=nan", ["inner.rate", "finite number", "nan"]),
        ("inner.rate=inf", ["inner.rate", "finite number"]),
        ("inner.rate=-Infinity", ["inner.rate", "finite number"]),
    ],
)
def test_cli_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(Outer, None, [override])
    for word in words:
        assert word in str(info.value)


def test_yaml_errors_name_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner:\n  rate: fast\n")
    with pytest.raises(ConfigError, match="inner.rate: expected a number"):
        load_config(Outer, bad)
    bad.write_text("inner:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.bogus' in .*bad.yaml"):
        load_config(Outer, bad)
    bad.write_text("inner:\n  rate: .nan\n")  # YAML's own spelling of NaN, read as a float
    with pytest.raises(ConfigError, match="inner.rate: expected a finite number"):
        load_config(Outer, bad)
    bad.write_text("steps: 1.5\n")
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(Outer, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_section_validation_reports_the_override():
    with pytest.raises(ConfigError, match=r"sampler \(with the command-line overrides\): window_size must be in \[1, num_steps=16\], got 17"):
        load_config(GSPOTrainConfig, None, ["sampler.window_size=17"])
    # Checks across fields see all overrides of a section at once, in any order.
    cfg = load_config(GSPOTrainConfig, None, ["sampler.window_size=20", "sampler.num_steps=24"])
    assert (cfg.sampler.num_steps, cfg.sampler.window_size) == (24, 20)


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(GSPOTrainConfig, None, ["sampler.eta=0.9", "sampler.tail_solver=dpmpp_2m", f"run.output_root={tmp_path}"])
    run_dir = create_run_dir(cfg.run, cfg, prefix="t")
    assert load_config(GSPOTrainConfig, run_dir / "config.yaml") == cfg
    with pytest.raises(RunFolderError, match="already exists"):
        create_run_dir(RunConfig(output_root=str(tmp_path), name=run_dir.name), cfg, prefix="t")
    nested = Outer(steps=3, inner=Inner(sizes=(7,), path="p"))
    save_config(nested, tmp_path / "o.yaml")
    assert load_config(Outer, tmp_path / "o.yaml") == nested


def test_sections_from_yaml_files(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "inner.yaml").write_text("mode: b\nsizes: [9]\n")
    (tmp_path / "main.yaml").write_text("steps: 4\ninner: parts/inner.yaml\n")  # relative to main.yaml
    assert load_config(Outer, tmp_path / "main.yaml") == Outer(steps=4, inner=Inner(mode="b", sizes=(9,)))
    cfg = load_config(Outer, None, [f"inner={tmp_path / 'parts' / 'inner.yaml'}", "inner.rate=0.5"])
    assert cfg.inner == Inner(rate=0.5, mode="b", sizes=(9,))
    (tmp_path / "parts" / "bad.yaml").write_text("mood: b\n")
    (tmp_path / "main.yaml").write_text("inner: parts/bad.yaml\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.mood' in .*bad.yaml"):
        load_config(Outer, tmp_path / "main.yaml")


def test_a_section_file_replaces_the_section():
    """The reward file of a preset must not inherit the embedded default's weight-free reward."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    expected = {"id": 0.5, "text": 1.4, "aesthetic": 0.7}
    assert load_config(GSPOTrainConfig, configs / "ippo_multi_human.yaml").reward.resolved_weights() == expected
    from_cli = load_config(GSPOTrainConfig, None, [f"reward={configs / 'rewards' / 'multi_human.yaml'}"])
    assert from_cli.reward.resolved_weights() == expected
    assert load_config(GSPOTrainConfig, None, ["reward.preset=multi_object"]).reward.resolved_weights() == {"id": 1.0, "text": 1.4, "aesthetic": 0.7}
    assert GSPOTrainConfig().reward.resolved_weights() == {"colour_target": 1.0}


@pytest.mark.parametrize("name", ["quickstart.yaml", "ippo_multi_human.yaml", "ippo_multi_object.yaml"])
def test_shipped_train_configs_load(name):
    from pathlib import Path

    cfg = load_config(GSPOTrainConfig, Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.sampler.num_steps == 16 and cfg.sampler.window_size == 2
    assert cfg.learner.minibatches > 1  # several optimizer steps per iteration, so the off-policy steps exist
    if name != "quickstart.yaml":  # MultiCrafter Algorithm 1 / Appendix B, read as MixGRPO does
        assert (cfg.iterations, cfg.sampler.window_shift_interval, cfg.sampler.window_stride) == (300, 50, 1)
        assert cfg.rollout.groups_per_iteration == cfg.workers.learners == 16 and cfg.rollout.chunk_size == 1  # a group per GPU
        assert (cfg.rollout.image_size, cfg.rollout.reference_size) == (512, 320)
        assert cfg.learner.minibatches == 4 and cfg.learner.algorithm == "gspo"  # MixGRPO's 4 steps per rollout


def test_sharded_learners_need_equal_shares_of_each_minibatch():
    """FSDP ranks make collective calls per chunk: a minibatch must divide evenly over them (replicated
    learners may hold one chunk more or less)."""
    uneven = ["rollout.groups_per_iteration=3", "rollout.group_size=4", "rollout.chunk_size=2", "workers.learners=4"]
    assert load_config(GSPOTrainConfig, None, uneven).learner.sharding == "replicate"  # 6 chunks over 4 ranks: allowed
    with pytest.raises(ConfigError) as info:
        load_config(GSPOTrainConfig, None, [*uneven, "learner.sharding=fsdp"])
    assert "learner.sharding=fsdp" in str(info.value) and "workers.learners=4" in str(info.value)
    assert load_config(GSPOTrainConfig, None, [*uneven[:3], "workers.learners=3", "learner.sharding=fsdp"]).workers.learners == 3
