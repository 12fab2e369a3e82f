"""The stage registry: one small class per warm-start stage says everything that differs between stages,
so the objective and the trainer hold no per-stage branches.

| stage | policy it trains | attention switches | prompt phrases | extra loss | batches |
| --- | --- | --- | --- | --- | --- |
| single | as configured | none | none | none | the manifest |
| idar | as configured | map capture in double blocks | none | lambda Dice(maps, masks), 0.3 (MultiCrafter Eq. 4-6) | the manifest |
| diptych | dual-branch LoRA for plain LoRA and MoE-LoRA, MUSAR static routing | none | none | none | single -> 80/20 -> same-category diptychs |
| position_id | condition-id positions, temperature MLP (Dynamic Attention Modulation) | none | shared by a conditioning group | none | the manifest |
| routing | as configured | prompt routing-map capture | per sample | lambda mean ||M - M_gt||^2, 0.1 (AnyStory Eq. 4) | the manifest |

Attention features that act at inference (routing, temperature) belong to the trained policy's attention
mode (``PolicyConfig.attention``, saved in policy.yaml), so RL, evaluation and generation run them too;
a stage's own switches are the captures its regularizer needs.

``STAGES`` (the names, in this order) and the config's ``stage`` Literal come from ``REGISTRY``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Literal, Protocol, Sequence

import torch

from policies import AttentionSwitches, FluxPolicy, PolicyConfig, dice_loss, routing_loss
from rl_align.sft.builders.diptych import build_diptych_manifest
from rl_align.sft.data import BatchStream, SFTDataConfig
from rl_align.sft.manifest import SampleRecord
from samplers.noise import key_seed

if TYPE_CHECKING:
    from policies.policy import PolicyOutput
    from rl_align.sft.config import DiptychConfig, SFTConfig

log = logging.getLogger(__name__)


class StageData(Protocol):
    """What a stage builds its batch streams from; the trainer provides it (and its rank logic)."""

    cfg: SFTConfig
    manifest: Path  # the checked manifest the samples come from
    run_dir: Path

    def stream(self, samples: Sequence[SampleRecord], root: Path, curriculum: bool = False) -> BatchStream:
        """This process's share of the batches of ``samples`` (paths relative to ``root``). ``curriculum``:
        the stream gives every step's batch, so it carries MS-CustomNet's subject-count curriculum when
        ``cfg.curriculum`` enables it (E: the epochs the run's steps traverse)."""

    def built(self, manifest: Path, build: Callable[[], object]) -> list[SampleRecord]:
        """The checked samples of ``manifest``, written by ``build`` first (once) when it does not exist."""

DiptychSource = Literal["single", "random", "same_category"]
PhraseSpans = Literal["none", "shared", "per_sample"]


class StageRecipe:
    """A stage with no extras: flow matching on the manifest's batches with the configured policy."""

    name: ClassVar[str] = "single"
    switches: ClassVar[AttentionSwitches] = AttentionSwitches()
    # Where each subject's caption sits in the prompt: "shared" spans place item phrases in the position
    # ids (a conditioning group shares them), "per_sample" spans feed per-sample routing maps.
    phrase_spans: ClassVar[PhraseSpans] = "none"
    condition_ids: ClassVar[bool] = False  # references placed by their category's condition id
    loss_term: ClassVar[str | None] = None  # the LossTerms field the stage's regularizer fills
    sources: ClassVar[tuple[str, ...]] = ("main",)  # batch streams by name
    eval_source: ClassVar[str] = "main"  # the stream of the fixed evaluation batch

    def trained_policy(self, policy: PolicyConfig) -> PolicyConfig:
        return policy

    def check_config(self, cfg: SFTConfig) -> None:
        """Raise ValueError when ``cfg`` asks for something this stage cannot do."""

    def check_sample(self, policy: FluxPolicy, sample: SampleRecord, data: SFTDataConfig) -> list[str]:
        """What the stage needs beyond a valid manifest line: captions inside their prompts (phrase
        stages) and categories with a condition id."""
        reasons = []
        if self.condition_ids:
            try:
                policy.condition_ids([s.category for s in sample.subjects])
            except ValueError as exc:
                reasons.append(str(exc))
        if self.phrase_spans != "none":
            try:
                policy.item_spans(sample.prompt, [s.caption for s in sample.subjects])
            except ValueError as exc:
                reasons.append(f"stage {self.name} needs each caption in the prompt: {exc}")
        return reasons

    def regularizer(self, out: PolicyOutput, masks: torch.Tensor) -> torch.Tensor:
        """The extra loss term (before its weight) from the model output and the subjects' token masks."""
        raise NotImplementedError(f"stage {self.name} has no regularizer")

    def regularizer_weight(self, cfg: SFTConfig) -> float:
        raise NotImplementedError(f"stage {self.name} has no regularizer")

    def source(self, step: int, cfg: SFTConfig) -> str:
        """The stream the batch of ``step`` comes from."""
        return "main"

    def streams(self, samples: Sequence[SampleRecord], data: StageData) -> dict[str, BatchStream]:
        """The stage's batch streams by name (``sources``)."""
        return {"main": data.stream(samples, data.manifest.parent, curriculum=True)}


class IdarStage(StageRecipe):
    name = "idar"
    switches = AttentionSwitches(capture=True)
    loss_term = "attention"

    def check_sample(self, policy: FluxPolicy, sample: SampleRecord, data: SFTDataConfig) -> list[str]:
        """Also: a subject of a crop category (MultiCrafter: a human's reference is the face crop, and its
        mask the face in the target) needs the reference_mask to crop with; used whole, its reference
        would not match the region its attention map is regularized towards."""
        reasons = super().check_sample(policy, sample, data)
        for index, subject in enumerate(sample.subjects):
            if subject.category in data.crop_reference_categories and subject.reference_mask is None:
                reasons.append(
                    f"subject {index} ({subject.category!r}) has no reference_mask: stage idar crops references of the categories "
                    f"{list(data.crop_reference_categories)} (data.crop_reference_categories) to it"
                )
        return reasons

    def regularizer(self, out: PolicyOutput, masks: torch.Tensor) -> torch.Tensor:
        return dice_loss(out.attention_maps, masks)

    def regularizer_weight(self, cfg: SFTConfig) -> float:
        return cfg.idar.attention_weight


class DiptychStage(StageRecipe):
    """MUSAR: dual-branch LoRA in place of plain LoRA and MoE-LoRA (no adapter touches prompt tokens), static
    routing (in the policy's attention mode), and the diptych curriculum over three streams (single-subject
    samples, random-pair and same-category diptychs built at start)."""

    name = "diptych"
    sources = ("single", "random", "same_category")
    eval_source = "same_category"

    def trained_policy(self, policy: PolicyConfig) -> PolicyConfig:
        return dataclasses.replace(
            policy,
            lora=dataclasses.replace(policy.lora, enabled=False),
            moe_lora=dataclasses.replace(policy.moe_lora, enabled=False),  # ff_context.net.2 would adapt prompt tokens
            dual_branch=dataclasses.replace(policy.dual_branch, enabled=True),
            attention=dataclasses.replace(policy.attention, static_routing=True),
        )

    def check_config(self, cfg: SFTConfig) -> None:
        if cfg.curriculum.enabled:
            raise ValueError("stage diptych has its own curriculum (diptych.*); set curriculum.enabled=false")

    def source(self, step: int, cfg: SFTConfig) -> str:
        return diptych_source(step, cfg.diptych, cfg.run.seed)

    def streams(self, samples: Sequence[SampleRecord], data: StageData) -> dict[str, BatchStream]:
        """The manifest's single-subject samples are the single-subject data and the diptych sources; each
        pairing's diptychs are built once into the run folder (a resumed run finds them there)."""
        singles = [s for s in samples if len(s.subjects) == 1]
        log.info("diptych: %d of %d samples have one subject and are the single-subject data and the diptych sources", len(singles), len(samples))
        if len(singles) < 2:
            raise ValueError(f"stage diptych needs single-subject samples to pair; {data.manifest} has {len(singles)}")
        streams = {"single": data.stream(singles, data.manifest.parent)}
        for pairing in ("random", "same_category"):
            folder = data.run_dir / "data" / f"diptych-{pairing}"
            pair_seed = key_seed("diptych", data.cfg.run.seed, pairing) % 2**31
            pairs = data.built(
                folder / "manifest.jsonl",
                lambda: build_diptych_manifest(singles, data.manifest.parent, folder, pairing, data.cfg.diptych.pairs, pair_seed),  # noqa: B023
            )
            streams[pairing] = data.stream(pairs, folder)
            log.info("diptych: %d %s pairs in %s", len(pairs), pairing, folder / "manifest.jsonl")
        return streams


class PositionIdStage(StageRecipe):
    """One-for-All: condition-id positions, item phrases at their reference's centroid, Dynamic Attention
    Modulation (the temperature MLP)."""

    name = "position_id"
    phrase_spans = "shared"
    condition_ids = True

    def trained_policy(self, policy: PolicyConfig) -> PolicyConfig:
        return dataclasses.replace(policy, position_scheme="condition_id", attention=dataclasses.replace(policy.attention, temperature=True))


class RoutingStage(StageRecipe):
    name = "routing"
    switches = AttentionSwitches(capture_routing=True)
    phrase_spans = "per_sample"
    loss_term = "routing"

    def regularizer(self, out: PolicyOutput, masks: torch.Tensor) -> torch.Tensor:
        return routing_loss(out.routing_maps, masks)

    def regularizer_weight(self, cfg: SFTConfig) -> float:
        return cfg.routing.routing_weight


REGISTRY: dict[str, StageRecipe] = {stage.name: stage for stage in (StageRecipe(), IdarStage(), DiptychStage(), PositionIdStage(), RoutingStage())}
STAGES: tuple[str, ...] = tuple(REGISTRY)


def stage_recipe(name: str) -> StageRecipe:
    if name not in REGISTRY:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return REGISTRY[name]


def stage_policy(policy: PolicyConfig, stage: str) -> PolicyConfig:
    """The policy ``stage`` trains (its changes to the configured one)."""
    return stage_recipe(stage).trained_policy(policy)


def diptych_source(step: int, cfg: DiptychConfig, seed: int) -> DiptychSource:
    """MUSAR's three-phase curriculum: single-subject batches for single_steps, then for mixed_steps a
    seeded draw of single-subject batches (mixed_single_fraction) or random-pair diptychs, then
    same-category diptychs."""
    if step < cfg.single_steps:
        return "single"
    if step < cfg.single_steps + cfg.mixed_steps:
        draw = key_seed("diptych-mix", seed, step) / 2**63
        return "single" if draw < cfg.mixed_single_fraction else "random"
    return "same_category"
