"""The composite reward (MultiCrafter Eq. 9): R = sum_k w_k R_k over the loaded components, and the
builder that loads each component from the paths in a RewardConfig (failing at start-up, with the path
and what belongs there, when a file is missing)."""

from __future__ import annotations

from importlib import metadata
from typing import Mapping, Sequence

import numpy as np

from rewards.config import RewardConfig
from rewards.types import RewardResult, ScoreBatch, Scorer, reads_reference_images


def weighted_sum(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """R[b] = sum_k weights[k] * components[k][b] (Eq. 9); each component (B,) -> (B,)."""
    arrays = list(components.values())
    total = np.zeros(len(arrays[0]) if arrays else 0)
    for name, values in components.items():
        total = total + weights[name] * np.asarray(values, dtype=np.float64)
    return total


class CompositeReward:
    """Scores a batch with every component and combines them with their weights."""

    def __init__(self, scorers: Sequence[Scorer], weights: Mapping[str, float]):
        self.scorers = {scorer.name: scorer for scorer in scorers}
        missing = sorted(set(self.scorers) ^ set(weights))
        if missing or len(self.scorers) != len(scorers):
            raise ValueError(f"weights and scorers must name the same components once each; mismatch: {missing}")
        if not self.scorers:
            raise ValueError("the composite reward has no components: set a preset or a non-zero weight")
        self.weights = dict(weights)

    @property
    def reads_reference_images(self) -> bool:
        """Whether any component looks at the reference subjects' pixels (rewards.types.reads_reference_images)."""
        return any(reads_reference_images(scorer) for scorer in self.scorers.values())

    def score(self, batch: ScoreBatch) -> RewardResult:
        components = {}
        for name, scorer in self.scorers.items():
            values = np.asarray(scorer.score(batch), dtype=np.float64)
            if values.shape != (len(batch),):
                raise RuntimeError(f"scorer {name!r} returned shape {values.shape}, expected ({len(batch)},)")
            if not np.all(np.isfinite(values)):
                bad = np.flatnonzero(~np.isfinite(values)).tolist()
                raise RuntimeError(f"scorer {name!r} returned non-finite scores for images {bad}")
            components[name] = values
        return RewardResult(rewards=weighted_sum(components, self.weights), components=components)


def _build_scorer(name: str, cfg: RewardConfig) -> Scorer:
    # Imported per component: the weight-free quickstart never imports torch, dlib or open_clip.
    if name == "jpeg_compressibility" or name == "jpeg_incompressibility":
        from rewards.weight_free import JpegSizeScorer

        return JpegSizeScorer(name, -1.0 if name == "jpeg_compressibility" else 1.0, cfg.jpeg)
    if name == "colour_target":
        from rewards.weight_free import ColourTargetScorer

        return ColourTargetScorer(cfg.colour)
    if name in ("subject_count", "background"):
        from rewards.shapes import BackgroundScorer, SubjectCountScorer

        return SubjectCountScorer(cfg.object.shapes) if name == "subject_count" else BackgroundScorer(cfg.object.shapes)
    if name == "id":
        from rewards.identity import IdentityScorer

        embedders = []
        if "face" in cfg.id_kinds:
            from rewards.faces import build_face_embedder

            embedders.append(build_face_embedder(cfg.face))
        if "object" in cfg.id_kinds and cfg.object.backend == "shapes":
            from rewards.shapes import ShapeSubjectEmbedder  # numpy, scipy and PIL only: no torch

            embedders.append(ShapeSubjectEmbedder(cfg.object.shapes))
        elif "object" in cfg.id_kinds:
            from rewards.objects import ObjectEmbedder

            embedders.append(ObjectEmbedder.from_config(cfg.object, cfg.device))
        return IdentityScorer(embedders)
    if name == "text":
        from rewards.clip_scores import ClipTextScorer

        return ClipTextScorer.from_config(cfg.clip, cfg.device)
    if name == "aesthetic":
        from rewards.clip_scores import HpsScorer

        return HpsScorer.from_config(cfg.hps, cfg.device)
    raise ValueError(f"unknown reward component {name!r}")


def build_reward(cfg: RewardConfig) -> CompositeReward:
    """Load every component with a non-zero weight."""
    weights = cfg.resolved_weights()
    return CompositeReward([_build_scorer(name, cfg) for name in weights], weights)


def reward_info(cfg: RewardConfig) -> dict:
    """What /v1/info reports: components and weights, their backends and the versions of the packages."""
    weights = cfg.resolved_weights()
    backends = {}
    if "id" in weights:
        backends["id"] = {
            "kinds": list(cfg.id_kinds),
            "face_backend": cfg.face.backend if "face" in cfg.id_kinds else None,
            "object_backend": cfg.object.backend if "object" in cfg.id_kinds else None,
        }
    if "text" in weights:
        backends["text"] = {"model": cfg.clip.model_name}
    if "aesthetic" in weights:
        backends["aesthetic"] = {"model": cfg.hps.model_name}
    versions = {}
    for package in (
        "rl-align",
        "numpy",
        "scipy",
        "torch",
        "transformers",
        "open_clip_torch",
        "insightface",
        "onnxruntime",
        "onnxruntime-gpu",
        "dlib-bin",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"preset": cfg.preset, "weights": weights, "backends": backends, "versions": versions}
