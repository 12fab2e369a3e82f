"""The config of ``scripts/train_gspo.py`` (IPPO with GSPO). Sections are added as the learner grows."""

from __future__ import annotations

from dataclasses import dataclass, field

from rl_align.runs import RunConfig
from samplers import SamplerConfig


@dataclass(frozen=True)
class GSPOTrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
