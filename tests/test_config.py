"""Config system: precedence, errors that name the key, and the resolved-config round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from rl_align.config import ConfigError, apply_overrides, load_config, save_config
from rl_align.runs import RunConfig, create_run_dir
from rl_align.train_config import GSPOTrainConfig


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
        ("inner=3", ["inner", "section"]),
        ("steps.x=3", ["steps", "not a section"]),
        ("steps", ["key=value"]),
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
    bad.write_text("steps: 1.5\n")
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(Outer, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_section_validation_reports_the_override():
    with pytest.raises(ConfigError, match="sampler.window_size=17.*num_steps=16"):
        load_config(GSPOTrainConfig, None, ["sampler.window_size=17"])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(GSPOTrainConfig, None, ["sampler.eta=0.9", "sampler.tail_solver=dpmpp_2m", f"run.output_root={tmp_path}"])
    run_dir = create_run_dir(cfg.run, cfg, prefix="t")
    assert load_config(GSPOTrainConfig, run_dir / "config.yaml") == cfg
    with pytest.raises(FileExistsError, match="already exists"):
        create_run_dir(RunConfig(output_root=str(tmp_path), name=run_dir.name), cfg, prefix="t")
    nested = Outer(steps=3, inner=Inner(sizes=(7,), path="p"))
    save_config(nested, tmp_path / "o.yaml")
    assert load_config(Outer, tmp_path / "o.yaml") == nested


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(GSPOTrainConfig, root / "quickstart.yaml").sampler.window_shift_interval == 10
