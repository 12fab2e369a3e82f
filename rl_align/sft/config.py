"""The config of ``scripts/sft.py``: supervised warm-start stages whose adapters seed ``train_gspo.py``.

Defaults are the embedded quickstart: the tiny random-init policy, the offline synthetic shapes, CPU.
``stage`` picks the recipe (rl_align/sft/stages.py); the paper presets live in configs/sft/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from policies import PolicyConfig
from rl_align.core.flow_matching import TimestepConfig
from rl_align.core.runs import RunConfig
from rl_align.sft.data import SFTDataConfig
from rl_align.sft.stages import STAGES, stage_recipe

Stage = Literal[STAGES]  # the registry's stage names


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    warmup_steps: int = 0  # linear warm-up from 0
    # MS-CustomNet Dual Stage Training: after first_stage_fraction of the steps the learning rate drops
    # to second_learning_rate (paper: 7 of 10 epochs at 1e-4, then 5e-5). 0 keeps one stage.
    second_learning_rate: float = 0.0
    first_stage_fraction: float = 0.7
    load_balancing_weight: float = 0.0  # MoE-LoRA: weight of the Switch load-balancing loss

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.second_learning_rate < 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0, second_learning_rate and warmup_steps >= 0")
        if not 0 < self.first_stage_fraction <= 1:
            raise ValueError(f"first_stage_fraction must be in (0, 1], got {self.first_stage_fraction}")


@dataclass(frozen=True)
class IdarConfig:
    """MultiCrafter's Identity-Disentangled Attention Regularization (Eq. 4-6): L = L_diff + lambda Dice."""

    attention_weight: float = 0.3  # lambda (Appendix B)


@dataclass(frozen=True)
class DiptychConfig:
    """MUSAR's de-biased diptych learning with its three-phase curriculum (Sec. 4.1): single-subject
    samples only, then diptychs of random pairs mixed with single samples, then same-category diptychs.
    Diptychs are built at start from the manifest's single-subject samples, into the run folder."""

    single_steps: int = 10  # phase 1 (paper: 20k)
    mixed_steps: int = 10  # phase 2 (paper: 10k); phase 3 runs to the end (paper: 10k)
    mixed_single_fraction: float = 0.2  # phase 2: share of single-subject batches (paper: 20%)
    pairs: int = 64  # diptychs built for each pairing

    def __post_init__(self) -> None:
        if self.single_steps < 0 or self.mixed_steps < 0 or self.pairs < 1:
            raise ValueError("single_steps and mixed_steps must be >= 0 and pairs >= 1")
        if not 0 <= self.mixed_single_fraction <= 1:
            raise ValueError(f"mixed_single_fraction must be in [0, 1], got {self.mixed_single_fraction}")


@dataclass(frozen=True)
class RoutingConfig:
    """AnyStory's instance-aware routing regularization (Eq. 4) on the prompt router's maps."""

    routing_weight: float = 0.1  # lambda (Sec. 3.4)


@dataclass(frozen=True)
class CurriculumConfig:
    """MS-CustomNet's curriculum on subject quantity (Eq. 15-16): in epoch e = 1..E a sample keeps a
    random subset of at most K(e) of its subjects; the last epoch trains max_subjects. E is the number of
    epochs that ``steps`` steps really traverse: under torchrun each step takes one batch per process,
    and an epoch is its (subject count, target size) buckets cut into batches of batch_size (so more than
    samples / batch_size batches), the subject counts being those the curriculum leaves
    (``rl_align.sft.data.curriculum_epochs``). Epochs past E, if any, stay at max_subjects."""

    enabled: bool = False
    min_subjects: int = 2  # K_min (paper: 2)
    max_subjects: int = 5  # K_max (paper: 5)
    gamma: float = 1.0  # pace (paper: 1.0)

    def __post_init__(self) -> None:
        if not 1 <= self.min_subjects <= self.max_subjects or self.gamma <= 0:
            raise ValueError("need 1 <= min_subjects <= max_subjects and gamma > 0")


@dataclass(frozen=True)
class SFTOutputConfig:
    eval_every: int = 10  # steps between losses on the fixed evaluation batch (and at start and end)
    sample_every: int = 20  # steps between sample grids (samples/step-NNNNNNNN.png)
    sample_steps: int = 8  # Euler steps of the sample grids
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    plot_every: int = 10  # steps between redraws of loss_curve.png

    def __post_init__(self) -> None:
        if min(self.eval_every, self.sample_every, self.sample_steps, self.checkpoint_every, self.keep_checkpoints, self.plot_every) < 1:
            raise ValueError("every output interval, sample_steps and keep_checkpoints must be >= 1")


@dataclass(frozen=True)
class SFTConfig:
    run: RunConfig = field(default_factory=RunConfig)
    stage: Stage = "single"
    steps: int = 40
    # Start from adapters written by an earlier stage (FluxPolicy.save_adapters); empty: fresh adapters.
    init_adapters: str = ""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    idar: IdarConfig = field(default_factory=IdarConfig)
    diptych: DiptychConfig = field(default_factory=DiptychConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    output: SFTOutputConfig = field(default_factory=SFTOutputConfig)
    # Keep only each transformer block's inputs in the forward and recompute the block in backward
    # (FluxPolicy.enable_block_checkpointing): the same loss and gradients, attention maps included, for
    # about one more forward of compute; what lets the paper presets' batches fit (benchmarks/memory_plan.py).
    checkpoint_blocks: bool = False
    # Data-parallel processes (torchrun): "replicate" keeps the whole policy in every process and all-reduces
    # the gradients; "fsdp" shards the transformer (frozen base, adapters, gradients, AdamW states) over them
    # with FSDP2 (FluxPolicy.shard_transformer). Evaluation and sample grids then run on every process.
    sharding: Literal["replicate", "fsdp"] = "replicate"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.policy.attention.dynamic_routing:
            raise ValueError("policy.attention.dynamic_routing is an inference-time mode (MUSAR Eq. 2-4): set it for RL, evaluation or generation, not warm-start training")
        stage_recipe(self.stage).check_config(self)
