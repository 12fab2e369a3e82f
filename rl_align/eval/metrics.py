"""Table 1's metrics on batches of generated images (``MetricBackends``), their aggregation over tasks
with bootstrap intervals, and the table in Table 1's layout.

Per task the K images' scores are averaged; a policy's figure is the mean over tasks, with a percentile
bootstrap interval from resampling the tasks (the same resamples for every policy and metric, so
identical policies get identical rows). A metric that does not apply to a task (Face-Sim on a task
without faces) is NaN there and left out of that metric's mean. Overall is Table 1's "AVG": the mean of
the similarity columns present, computed on each resample too.

Every policy runs the same tasks from the same seeds, so two policies are also compared task by task
(``paired_differences``): the interval of the per-task difference is the interval of the gain itself,
freed of how hard the sampled tasks happen to be, and narrower than either row's.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from rewards.composite import build_reward
from rewards.config import RewardConfig, WeightsConfig
from rewards.types import ReferenceSubject, ScoreBatch
from rl_align.core.errors import SetupError
from rl_align.eval.config import METRIC_TITLES, OVERALL_METRICS, MetricsConfig

log = logging.getLogger(__name__)

OVERALL = "overall"


class Summary(NamedTuple):
    mean: float  # NaN when no task has the metric
    low: float
    high: float
    tasks: int  # tasks the metric applies to


def nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """np.nanmean, NaN (without a warning) where every value is NaN: a metric that does not apply."""
    with warnings.catch_warnings():  # an all-NaN slice is a metric that does not apply: NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def summarize(per_task: Mapping[str, np.ndarray], samples: int, confidence: float, seed: int) -> dict[str, Summary]:
    """per_task: metric -> (T,) per-task means (NaN where the metric does not apply) -> metric -> Summary,
    plus OVERALL (the mean of the OVERALL_METRICS present). Intervals: percentile bootstrap over tasks,
    ``samples`` resamples drawn from ``seed``."""
    names = list(per_task)
    values = np.stack([np.asarray(per_task[n], dtype=np.float64) for n in names], axis=1)  # (T, M)
    tasks = values.shape[0]
    resamples = np.random.default_rng(seed).integers(0, tasks, size=(samples, tasks))  # (S, T)
    means = nanmean(values[resamples], axis=1)  # (S, M)
    overall_columns = [i for i, n in enumerate(names) if n in OVERALL_METRICS and np.isfinite(values[:, i]).any()]
    tail = (1 - confidence) / 2
    out = {}
    for i, name in enumerate(names):
        finite = np.isfinite(values[:, i])
        low, high = (np.nanquantile(means[:, i], [tail, 1 - tail]) if finite.any() else (np.nan, np.nan))
        out[name] = Summary(float(nanmean(values[:, i])), float(low), float(high), int(finite.sum()))
    if overall_columns:
        column_means = np.array([out[names[i]].mean for i in overall_columns])
        resampled = nanmean(means[:, overall_columns], axis=1)  # (S,)
        low, high = np.nanquantile(resampled, [tail, 1 - tail])
        out[OVERALL] = Summary(float(column_means.mean()), float(low), float(high), tasks)
    return out


def paired_differences(per_task: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], samples: int, confidence: float,
                       seed: int) -> dict[str, Summary]:
    """metric -> (T,) per-task means of a policy and of the reference policy, on the same tasks ->
    metric -> Summary of policy - reference: the mean difference over tasks and its percentile bootstrap
    interval from resampling the tasks' differences (the resamples of ``summarize``). OVERALL is the
    difference of the two Overall AVGs."""
    return summarize({m: np.asarray(per_task[m], dtype=np.float64) - np.asarray(reference[m], dtype=np.float64) for m in reference},
                     samples, confidence, seed)


def _cell(summary: Summary | None, signed: bool = False) -> str:
    if summary is None or not np.isfinite(summary.mean):
        return "—"
    number = "{:+.4f}" if signed else "{:.4f}"
    return f"{number.format(summary.mean)} [{number.format(summary.low)}, {number.format(summary.high)}]"


def table_markdown(rows: Mapping[str, Mapping[str, Summary]], metrics: Sequence[str], confidence: float,
                   differences: Mapping[str, Mapping[str, Summary]] | None = None, reference: str = "") -> str:
    """Table 1's layout: a row per policy, a column per metric (mean [interval]), then Overall AVG; with
    ``differences`` (policy -> its ``paired_differences`` from the ``reference`` policy) a second table
    of signed differences, a row per other policy."""
    columns = list(metrics) + [OVERALL]
    titles = [METRIC_TITLES.get(m, "Overall AVG") for m in columns]
    lines = [
        "| Policy | " + " | ".join(titles) + " |",
        "| --- | " + " | ".join("---" for _ in columns) + " |",
    ]
    for policy, summaries in rows.items():
        lines.append(f"| {policy} | " + " | ".join(_cell(summaries.get(m)) for m in columns) + " |")
    lines.append("")
    lines.append(f"Mean over tasks of the per-task mean over images; [{confidence:.0%} percentile bootstrap interval over tasks]; — : the metric does not apply.")
    if differences:
        lines += ["", f"| Difference from {reference} | " + " | ".join(titles) + " |", "| --- | " + " | ".join("---" for _ in columns) + " |"]
        for policy, summaries in differences.items():
            lines.append(f"| {policy} - {reference} | " + " | ".join(_cell(summaries.get(m), signed=True) for m in columns) + " |")
        lines.append("")
        lines.append(f"Paired: the mean over tasks of the per-task difference (same tasks, same seeds); [{confidence:.0%} percentile bootstrap "
                     "interval over tasks]; an interval that excludes 0 is a difference the sampled tasks do not explain.")
    return "\n".join(lines) + "\n"


def table_csv(rows: Mapping[str, Mapping[str, Summary]], metrics: Sequence[str]) -> str:
    """One line per policy and metric: policy,metric,mean,low,high,tasks."""
    lines = ["policy,metric,mean,low,high,tasks"]
    for policy, summaries in rows.items():
        for metric in list(metrics) + [OVERALL]:
            if metric in summaries:
                s = summaries[metric]
                lines.append(f"{policy},{metric},{s.mean:.6f},{s.low:.6f},{s.high:.6f},{s.tasks}")
    return "\n".join(lines) + "\n"


@dataclass
class MetricBackends:
    """The scorers behind the configured metrics, loaded for the subject kinds the benchmark has."""

    cfg: MetricsConfig
    kinds: frozenset[str]

    def __post_init__(self) -> None:
        try:
            self._load()
        except FileNotFoundError as exc:
            raise SetupError(f"metrics: {exc}") from None

    def _load(self) -> None:
        cfg, wanted = self.cfg, set(self.cfg.metrics)
        self.text = self.hps = self.face = self.id = self.dino = self.clip_image = None
        self.locators = []
        if "clip_t" in wanted:
            from rewards.clip_scores import ClipTextScorer

            self.text = ClipTextScorer.from_config(cfg.clip, cfg.device)
        if "hps" in wanted:
            from rewards.clip_scores import HpsScorer

            self.hps = HpsScorer.from_config(cfg.hps, cfg.device)
        needs_locators = bool(wanted & {"dino_i", "clip_i", "subjects_found"})
        if "face" in self.kinds and ("face_sim" in wanted or needs_locators):
            from rewards.faces import build_face_embedder
            from rewards.identity import IdentityScorer

            embedder = build_face_embedder(cfg.face)
            self.face = IdentityScorer([embedder])
            if needs_locators:
                from rewards.subject_crops import FaceLocator

                self.locators.append(FaceLocator(embedder))
        if "object" in self.kinds and needs_locators:
            self.locators.append(_object_locator(cfg))
        weight_free = sorted(wanted & {"subject_count", "background"})
        self.weight_free = build_reward(RewardConfig(preset="custom", weights=WeightsConfig(**{n: 1.0 for n in weight_free}), object=cfg.object)).scorers if weight_free else {}
        if "id" in wanted and self.kinds:
            reward = RewardConfig(preset="custom", weights=WeightsConfig(id=1.0), id_kinds=tuple(sorted(self.kinds)), device=cfg.device, face=cfg.face, object=cfg.object)
            self.id = build_reward(reward).scorers["id"]
        if "dino_i" in wanted:
            from rewards.objects import Dinov2Embedder

            self.dino = Dinov2Embedder.from_dir(cfg.object.dinov2_dir, cfg.device)
        if "clip_i" in wanted:
            from rewards.subject_crops import ClipImageEmbedder

            self.clip_image = ClipImageEmbedder.from_checkpoint(cfg.clip.model_name, cfg.clip.checkpoint, cfg.device)

    def score(self, batch: ScoreBatch) -> dict[str, np.ndarray]:
        """metric -> (B,) for every configured metric; NaN where it does not apply to an image."""
        wanted, size = self.cfg.metrics, len(batch)
        out: dict[str, np.ndarray] = {}
        if self.text is not None:
            out["clip_t"] = self.text.score(batch)
        if self.hps is not None:
            out["hps"] = self.hps.score(batch)
        for name, scorer in self.weight_free.items():
            out[name] = scorer.score(batch)
        if "face_sim" in wanted:
            out["face_sim"] = _face_sim(self.face, batch)
        if "id" in wanted:
            has_references = np.array([bool(r) for r in batch.references])
            out["id"] = np.where(has_references, self.id.score(batch), np.nan) if self.id is not None else np.full(size, np.nan)
        if self.locators:
            from rewards.subject_crops import crop_similarity, locate_batch

            located = locate_batch(batch, self.locators)
            if self.dino is not None:
                out["dino_i"] = crop_similarity(located, self.dino)
            if self.clip_image is not None:
                out["clip_i"] = crop_similarity(located, self.clip_image)
            if "subjects_found" in wanted:
                out["subjects_found"] = np.array([float(image.subjects_found()) for image in located])
        for name in wanted:
            out.setdefault(name, np.full(size, np.nan))  # a metric the benchmark's kinds give nothing to
        return {name: out[name] for name in wanted}


def _face_sim(scorer, batch: ScoreBatch) -> np.ndarray:
    """Face-Sim over each image's face references only (NaN for an image without any)."""
    faces: list[tuple[ReferenceSubject, ...]] = [tuple(s for s in subjects if s.kind == "face") for subjects in batch.references]
    scores = np.full(len(batch), np.nan)
    rows = [i for i, f in enumerate(faces) if f]
    if rows and scorer is not None:
        subset = ScoreBatch([batch.images[i] for i in rows], [batch.prompts[i] for i in rows], [faces[i] for i in rows])
        scores[rows] = scorer.score(subset)
    return scores


def _object_locator(cfg: MetricsConfig):
    if cfg.object.backend == "shapes":
        from rewards.shapes import ShapeSubjectEmbedder

        from rewards.subject_crops import ShapeLocator

        return ShapeLocator(ShapeSubjectEmbedder(cfg.object.shapes))
    from rewards.objects import FlorenceGrounder
    from rewards.subject_crops import GroundingLocator

    return GroundingLocator(FlorenceGrounder.from_dir(cfg.object.florence_dir, cfg.device, cfg.object.max_new_tokens), cfg.object.dedupe_iou)

